# PSGI test app (Starlet under Server::Starter in examples/bench_alternatives),
# the same app as config.ru and app.py:
#
#   GET /   sleeps ?sleep=N ms (default: random 20..50 ms); answers "pid=<pid>\n"
#
# Every answer is 200 text/plain with an X-Pid header.
# APP_BOOT_SLEEP_MS=N sleeps N ms while the app loads (a slow boot).
use strict;
use warnings;
use Time::HiRes ();

my ($boot_ms) = ($ENV{APP_BOOT_SLEEP_MS} // '') =~ /^(\d+)$/;
Time::HiRes::sleep($boot_ms / 1000) if $boot_ms;

my $app = sub {
    my $env = shift;
    my ($ms) = ($env->{QUERY_STRING} // '') =~ /(?:^|&)sleep=(\d+)/;
    $ms = 20 + int(rand(31)) unless defined $ms;
    Time::HiRes::sleep($ms / 1000);
    my $body = "pid=$$\n";
    return [200, ['Content-Type' => 'text/plain', 'Content-Length' => length($body), 'X-Pid' => $$], [$body]];
};
$app;

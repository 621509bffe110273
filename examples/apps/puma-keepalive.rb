# Puma 5.6.5 behind a proxy with a keep-alive pool (nginx `keepalive`,
# Apache's default backend reuse), single mode: a lame-duck drain.
#
# On TERM, Puma 5.6.5 closes every idle keep-alive connection within about
# a millisecond; a proxy that reuses one in that instant fails the request
# (Apache: 502 or a closed client connection; nginx retries a GET, never a
# POST). Here TERM first turns keep-alive off for LAME_DUCK seconds: every
# response says `Connection: close` and the connection is closed after it,
# so the proxy stops reusing them one request at a time; only then does
# Puma's own graceful stop run. A second TERM stops at once.
#
# Measured (README, "nginx and Apache in front"). Single mode only: in
# cluster mode Puma's workers set their own TERM handler after every hook.
# Puma 5.6.5's DSL has no hook that runs after Puma sets its signal
# handlers, so this wraps Launcher#setup_signals (the config file is loaded
# before it runs).
LAME_DUCK_SECONDS = Float(ENV.fetch("PUMA_LAME_DUCK_SECONDS", "2"))

module HoldfastLameDuck
  def setup_signals
    super
    graceful = nil
    graceful = Signal.trap("TERM") do
      Signal.trap("TERM", graceful)
      # What Puma does at shutdown anyway (server.rb handle_servers), early:
      # no connection goes back to keep-alive.
      ObjectSpace.each_object(Puma::Server) { |s| s.instance_variable_set(:@queue_requests, false) }
      Thread.new do
        sleep LAME_DUCK_SECONDS
        Process.kill("TERM", Process.pid)
      end
    end
  end
end
Puma::Launcher.prepend(HoldfastLameDuck)

# Rack test app for holdfast's real-server tests (Puma, Unicorn).
#
#   GET /            sleeps rand(20..50) ms, or ?sleep=N ms; answers "pid=<pid>\n"
#   GET /grow?mb=N   allocates N MiB, touches every page and keeps it (memory tests)
#   GET /leak        leaks 1 MiB per request (touched)
#
# APP_BOOT_SLEEP_MS=N sleeps N ms while the app loads (slow-boot tests).
#
# Every answer is 200 text/plain with an X-Pid header, so a client can tell
# which worker served it.
require "rack"

# APP_BOOT_SLEEP_MS delays loading the app, to tell readiness from process start.
boot_ms = Integer(ENV.fetch("APP_BOOT_SLEEP_MS", "0"), exception: false) || 0
sleep(boot_ms / 1000.0) if boot_ms > 0

KEPT = [] # memory that /grow and /leak keep alive for the process lifetime
MIB = 1024 * 1024

# A String of `mb` MiB whose every page has been written.
def touched(mb)
  s = "\0".b * (mb * MIB)
  (0...s.bytesize).step(4096) { |i| s.setbyte(i, 1) }
  s
end

run lambda { |env|
  req = Rack::Request.new(env)
  pid = Process.pid
  extra = ""
  case req.path_info
  when "/grow"
    mb = Integer(req.params.fetch("mb", "1"), exception: false) || 1
    KEPT << touched(mb)
    extra = "grew=#{mb}MiB kept=#{KEPT.sum(&:bytesize) / MIB}MiB\n"
  when "/leak"
    KEPT << touched(1)
    extra = "kept=#{KEPT.sum(&:bytesize) / MIB}MiB\n"
  else
    ms = Integer(req.params.fetch("sleep", ""), exception: false) || rand(20..50)
    sleep(ms / 1000.0)
  end
  body = "pid=#{pid}\n#{extra}"
  [200, { "Content-Type" => "text/plain", "Content-Length" => body.bytesize.to_s, "X-Pid" => pid.to_s }, [body]]
}

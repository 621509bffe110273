# Puma 5.6.5 behind a proxy with a keep-alive pool (nginx `keepalive`,
# Apache's backend reuse), single mode: a lame-duck drain
# (puma -C puma-keepalive.rb ...).
#
# On TERM, Puma 5.6.5 closes every idle keep-alive connection within about a
# millisecond; a proxy that reuses one in that instant fails the request
# (Apache: 502, or the client's connection closed; nginx retries a GET, never
# a POST). Here TERM first starts a lame duck of PUMA_LAME_DUCK_SECONDS (2):
# Puma keeps serving, but every response says `Connection: close` and its
# connection is closed after it, so the proxy drops its pooled connections
# one request at a time. Then Puma's own graceful stop runs; the connections
# it closes then have been idle for the whole lame duck, longer than the
# proxy keeps an idle one (examples/nginx.conf `keepalive_timeout 1s`,
# examples/apache.conf `ttl=1`). A second TERM stops at once. Measured:
# README, "nginx and Apache in front".
#
# Puma 5.6.5 has no hook for either half, so this file wraps two of its
# methods (the config file is loaded before both run):
# Launcher#setup_signals, to put its own TERM handler in front of Puma's, and
# the response writer, to ask for `Connection: close` exactly as a client's
# `Connection: close` header does (request.rb str_headers). Single mode only:
# a cluster worker sets its own TERM handler after every hook.
module HoldfastLameDuck
  SECONDS = Float(ENV.fetch("PUMA_LAME_DUCK_SECONDS", "2"))

  class << self
    attr_accessor :active
  end

  module Responses
    private

    def str_headers(env, status, headers, res_info, lines, requests, client)
      env["HTTP_CONNECTION"] = "close" if HoldfastLameDuck.active
      super
    end
  end

  module Signals
    def setup_signals
      super
      graceful = nil
      graceful = Signal.trap("TERM") do
        Signal.trap("TERM", graceful)
        HoldfastLameDuck.active = true
        Thread.new do
          sleep SECONDS
          Process.kill("TERM", Process.pid)
        end
      end
    end
  end
end

Puma::Server.prepend(HoldfastLameDuck::Responses)
Puma::Launcher.prepend(HoldfastLameDuck::Signals)

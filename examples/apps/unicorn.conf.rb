# Unicorn settings for running under holdfast. The listening sockets come
# from holdfast through LISTEN_FDS (Unicorn takes every one of them when
# LISTEN_PID is its pid), so there is no `listen` line here.
worker_processes Integer(ENV.fetch("UNICORN_WORKERS", "2"))
preload_app true
timeout 30 # kills a worker stuck in one request this long; keep it under drain_timeout

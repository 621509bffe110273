# GET  /            20..50 ms of "work" (or ?sleep=N ms), answers "pid=<pid>"
# POST /            reads the body, answers its size
# GET  /slow        2 s (or ?sleep=N ms): a request a drain must wait for
# GET  /grow?mb=N   allocates N MiB, touches every page and keeps it: memory
#                   that holdfast's [memory] recycling must catch
class PagesController < ApplicationController
  KEPT = []
  MIB = 1024 * 1024

  def index
    ms = Integer(params.fetch(:sleep, rand(20..50)), exception: false) || 30
    sleep(ms / 1000.0)
    render plain: "pid=#{Process.pid}\n"
  end

  def create
    render plain: "pid=#{Process.pid} got=#{request.body.read.bytesize}\n"
  end

  def slow
    ms = Integer(params.fetch(:sleep, 2000), exception: false) || 2000
    sleep(ms / 1000.0)
    render plain: "pid=#{Process.pid} slept=#{ms}\n"
  end

  def grow
    mb = Integer(params.fetch(:mb, 1), exception: false) || 1
    s = "\0".b * (mb * MIB)
    (0...s.bytesize).step(4096) { |i| s.setbyte(i, 1) }
    KEPT << s
    render plain: "pid=#{Process.pid} kept=#{KEPT.sum(&:bytesize) / MIB}MiB\n"
  end
end

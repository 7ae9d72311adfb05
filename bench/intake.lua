-- wrk script for bench/intake.py: replay a pre-generated file of distinct pushes.
--
--   wrk -t T -c C -d CAP --timeout 10s -s bench/intake.lua URL -- FILE T QUOTA DURATION WRAP MARKERDIR
--
-- FILE holds one request per line, "path?query<TAB>body". Thread t takes lines
-- t, t+T, t+2T, ... so no two threads ever send the same push, and each line is
-- sent at most once (unless WRAP is 1: the bare app may cycle through them).
--
-- A thread sends real requests until it has sent its share of QUOTA (0: no
-- count limit), DURATION seconds have passed (0: no time limit) or its lines
-- run out. It then waits until every real request it sent has been answered,
-- so that the client's count of 200s is exact and can be compared with the
-- rows in the database. While it waits, a connection whose answer came back
-- sends a cheap GET /__wxbench_noop__ (404 on both apps) instead of a push:
-- a connected but silent socket would block a gunicorn sync worker on read.
-- Once settled, a thread writes MARKERDIR/settled.<t>; it stops as soon as
-- every thread has settled (immediately with one thread). intake.py interrupts
-- wrk when all markers are there (wrk itself always sleeps for its whole -d).
--
-- done() prints "WXBENCH ..." lines for intake.py: per-thread counts and the
-- CLOCK_MONOTONIC window from the first real request sent to the last real
-- answer received, status counts, and wrk's latency percentiles.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } wxbench_timespec;
int clock_gettime(int clk_id, wxbench_timespec *tp);
unsigned long pthread_self(void);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("wxbench_timespec")
local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local NOOP_STATUS = 404

-- Setup phase (wrk's main Lua state): number the threads, keep them for done().
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

-- Running phase: one Lua state per thread. Globals are read back by done().
local requests = {}
local noop_request
local nthreads, quota, deadline, wrap, marker_dir
local main_thread -- wrk's main thread: init() runs there, and so does the one
-- request() call wrk makes after thread 0's init() to check the script; that
-- call sends nothing and must not be counted.
local stopping = false
local pool_limited = false
sent, received, noop_sent, noop_received, exhausted, settled_flag = 0, 0, 0, 0, 0, 0
first_at, last_at = 0, 0
statuses = {}

function init(args)
  main_thread = ffi.C.pthread_self()
  local file = args[1]
  nthreads = tonumber(args[2])
  local total_quota, duration = tonumber(args[3]), tonumber(args[4])
  wrap, marker_dir = args[5] == "1", args[6]
  local i = 0
  for line in io.lines(file) do
    if i % nthreads == tid then
      local path, body = line:match("^([^\t]*)\t(.*)$")
      requests[#requests + 1] = wrk.format("POST", path, { ["Content-Type"] = "text/xml" }, body)
    end
    i = i + 1
  end
  if total_quota > 0 then
    quota = math.floor(total_quota / nthreads) + ((tid < total_quota % nthreads) and 1 or 0)
  else
    quota = math.huge
  end
  if not wrap and quota > #requests then
    quota = #requests -- never send a push twice
    pool_limited = true -- reaching it means the pool was too small for the run
  end
  if duration > 0 then
    deadline = now() + duration
  end
  noop_request = wrk.format("GET", "/__wxbench_noop__", {}, nil)
end

local function marker(name)
  local f = io.open(marker_dir .. "/" .. name, "w")
  if f then
    f:write(tostring(received))
    f:close()
  end
end

local function all_settled()
  for t = 0, nthreads - 1 do
    local f = io.open(marker_dir .. "/settled." .. t, "r")
    if not f then
      return false
    end
    f:close()
  end
  return true
end

local function check_done()
  if settled_flag == 0 then
    if received < sent then
      return
    end
    settled_flag = 1
    marker("settled." .. tid)
  end
  if nthreads == 1 or all_settled() then
    wrk.thread:stop()
  end
end

function request()
  if first_at == 0 and ffi.C.pthread_self() == main_thread then
    return noop_request -- wrk's check of the script, not a request on the wire
  end
  if not stopping then
    if sent >= quota then
      stopping = true
      if pool_limited then
        exhausted = 1
      end
    elseif deadline and now() >= deadline then
      stopping = true
    end
  end
  if stopping then
    noop_sent = noop_sent + 1
    return noop_request
  end
  sent = sent + 1
  if first_at == 0 then
    first_at = now()
  end
  local idx = sent
  if idx > #requests then
    idx = (idx - 1) % #requests + 1 -- only when wrapping: quota caps it otherwise
  end
  return requests[idx]
end

function response(status, headers, body)
  if status == NOOP_STATUS and noop_received < noop_sent then
    noop_received = noop_received + 1
  else
    received = received + 1
    last_at = now()
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
  end
  if not stopping and deadline and now() >= deadline then
    stopping = true
  end
  if stopping then
    check_done()
  end
end

function done(summary, latency, reqs)
  local e = summary.errors
  io.write(string.format("WXBENCH summary %d %d %d %d %d %d %d\n", summary.duration, summary.requests,
    e.connect, e.read, e.write, e.status, e.timeout))
  for _, p in ipairs({ 50, 90, 99, 99.9 }) do
    io.write(string.format("WXBENCH latency p%s %d\n", tostring(p), latency:percentile(p)))
  end
  io.write(string.format("WXBENCH latency max %d\n", latency.max))
  io.write(string.format("WXBENCH latency mean %d\n", latency.mean))
  for _, t in ipairs(threads) do
    local tid = t:get("tid")
    io.write(string.format("WXBENCH thread %d %d %d %d %d %d %d %.6f %.6f\n", tid, t:get("sent"),
      t:get("received"), t:get("noop_sent"), t:get("noop_received"), t:get("exhausted"),
      t:get("settled_flag"), t:get("first_at"), t:get("last_at")))
    for code, n in pairs(t:get("statuses") or {}) do
      io.write(string.format("WXBENCH status %d %s %d\n", tid, code, n))
    end
  end
end

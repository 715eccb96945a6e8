-- wrk script of bench/replicas.py: one fixed request, or one per key in turn; at the end the run's counts
-- and its whole latency histogram written to a file, so that the histograms of two wrk processes can be
-- merged exactly. With one key there is no request() function: wrk formats the request once per thread and
-- never calls Lua while the load runs.
-- Environment: BENCH_METHOD, BENCH_KEYS (comma-separated, sent as TT-API-KEY), BENCH_BODY (JSON; empty for
-- none), BENCH_OUT (the result file).

local keys = {}
for key in string.gmatch(os.getenv("BENCH_KEYS"), "[^,]+") do
  keys[#keys + 1] = key
end
wrk.method = os.getenv("BENCH_METHOD")
wrk.headers["TT-API-KEY"] = keys[1]
local body = os.getenv("BENCH_BODY")
if body ~= nil and body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

if #keys > 1 then
  local formatted, turn = {}, 0

  function init(args)
    for index, key in ipairs(keys) do
      wrk.headers["TT-API-KEY"] = key
      formatted[index] = wrk.format()
    end
  end

  function request()
    turn = turn % #formatted + 1
    return formatted[turn]
  end
end

function done(summary, latency, requests)
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  local errors = summary.errors
  out:write(string.format("requests %d\n", summary.requests))
  out:write(string.format("duration_us %d\n", summary.duration))
  out:write(string.format("status_errors %d\n", errors.status))  -- responses with a status above 399
  out:write(string.format("socket_errors %d\n", errors.connect + errors.read + errors.write + errors.timeout))
  for index = 1, #latency do
    local microseconds, count = latency(index)
    out:write(string.format("latency_us %d %d\n", microseconds, count))
  end
  out:close()
end

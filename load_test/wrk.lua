-- wrk script: POST the files named after `--` in turn, and print a JSON summary at the end.
-- wrk -t1 -c16 -d10s --timeout 60s -s load_test/wrk.lua URL -- a.jpg b.jpg ...
local bodies = {}
local next_body = 0

function init(args)
  for _, path in ipairs(args) do
    local file = assert(io.open(path, "rb"))
    bodies[#bodies + 1] = file:read("*a")
    file:close()
  end
  wrk.headers["Content-Type"] = "application/octet-stream"
end

function request()
  next_body = next_body % #bodies + 1
  return wrk.format("POST", nil, nil, bodies[next_body])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d}, "latency_us": {"p50": %d, "p90": %d, "p99": %d, "mean": %.1f, "max": %d}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end

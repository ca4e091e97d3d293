-- wrk script: POST one Open Inference Protocol request read from a file.
--   wrk -t2 -c64 -d10s -s bench/infer.lua http://127.0.0.1:PORT/v2/models/mlp/infer -- BODY_FILE [HEADER_LENGTH]
-- With HEADER_LENGTH the body is a binary-tensor request: the JSON header followed by the raw
-- tensor bytes (bench/serving.py writes it), HEADER_LENGTH the length of the JSON part (the
-- Inference-Header-Content-Length header). Without it the body is a plain JSON request.
-- done() prints one line "WRK_RESULT {json}" for bench/serving.py to parse.

function init(args)
   if #args < 1 or #args > 2 then
      error("usage: wrk ... -s infer.lua URL -- BODY_FILE [HEADER_LENGTH]")
   end
   local file = assert(io.open(args[1], "rb"))
   local body = file:read("*a")
   file:close()
   wrk.method = "POST"
   wrk.body = body
   if #args == 2 then
      wrk.headers["Content-Type"] = "application/octet-stream"
      wrk.headers["Inference-Header-Content-Length"] = args[2]
   else
      wrk.headers["Content-Type"] = "application/json"
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9)))
end

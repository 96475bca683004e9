-- wrk script: a distinct bearer token per request, taken in order from a file.
-- Usage: wrk -tT ... -s bench/pool.lua URL -- TOKENS_FILE T
-- (with T threads, thread k takes every T-th token starting at k, so no token is shared).
-- Used for the cache-miss scenario: every request carries a token tokengate has not seen,
-- so each one costs a TokenReview. If the run outlasts the pool, tokens repeat (cache hits);
-- done() prints how often that happened so run.sh can flag it.
local tokens, n, i = {}, 0, 0
wrapped = 0 -- global: read back from each thread in done()
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local nthreads = tonumber(args[2] or "1")
  local k = 0
  for line in io.lines(args[1]) do
    if #line > 0 then
      if k % nthreads == id then
        n = n + 1
        tokens[n] = "Bearer " .. line
      end
      k = k + 1
    end
  end
end

function request()
  i = i + 1
  if i > n then
    i = 1
    wrapped = wrapped + 1
  end
  return wrk.format(nil, nil, { ["Authorization"] = tokens[i] })
end

function done(summary, latency, requests)
  local w = 0
  for _, t in ipairs(threads) do
    w = w + (t:get("wrapped") or 0)
  end
  io.write(string.format("pool_wrapped %d\n", w))
end

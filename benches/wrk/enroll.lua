-- wrk script for the 201 path: every request is a new (student, course) pair.
-- args: <threads> <tokens file> <course id> [<course id> ...]
-- Thread t sends pairs k = t, t + threads, t + 2*threads, ...; pair k is student
-- k mod #tokens in course (k div #tokens) mod #courses, so no pair repeats while
-- k < #tokens * #courses. Two wrk processes given disjoint course lists never send the
-- same pair either.
--
-- The request text is built once per course (line, Host and any -H headers, up to
-- "Bearer ") and once per token (the token and the blank line), so a request costs one
-- string concatenation. wrk.format per request cost wrk ~8 us of CPU per request, on the
-- same cores as the server it measures.
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end

function init(args)
  nthreads = tonumber(args[1])
  local headers = ""
  for name, value in pairs(wrk.headers) do
    headers = headers .. name .. ": " .. value .. "\r\n"
  end
  heads = {}
  for i = 3, #args do
    heads[#heads + 1] = "POST /v1/courses/" .. args[i] .. "/enrollment HTTP/1.1\r\n"
      .. headers .. "Authorization: Bearer "
  end
  tails = {}
  for line in io.lines(args[2]) do tails[#tails + 1] = line .. "\r\n\r\n" end
  k = tid
end

function request()
  local n = #tails
  local req = heads[(math.floor(k / n) % #heads) + 1] .. tails[(k % n) + 1]
  k = k + nthreads
  return req
end

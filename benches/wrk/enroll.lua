-- wrk script for the 201 path: every request is a new (student, course) pair.
-- args: <threads> <tokens file> <course id> [<course id> ...]
-- Thread t sends pairs k = t, t + threads, t + 2*threads, ...; pair k is student
-- k mod #tokens in course (k div #tokens) mod #courses, so no pair repeats while
-- k < #tokens * #courses. Two wrk processes given disjoint course lists never send the
-- same pair either.
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end

function init(args)
  nthreads = tonumber(args[1])
  tokens = {}
  for line in io.lines(args[2]) do tokens[#tokens + 1] = line end
  paths = {}
  for i = 3, #args do paths[#paths + 1] = "/v1/courses/" .. args[i] .. "/enrollment" end
  k = tid
end

function request()
  local n = #tokens
  local t = tokens[(k % n) + 1]
  local path = paths[(math.floor(k / n) % #paths) + 1]
  k = k + nthreads
  return wrk.format("POST", path, { ["Authorization"] = "Bearer " .. t })
end

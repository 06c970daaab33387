-- wrk script for the 201 path: every request is a new (student, course) pair.
-- args: <threads> <tokens file> <courses> <course id prefix>
-- Thread t sends pairs k = t, t + threads, t + 2*threads, ...; pair k is student
-- k mod #tokens in course (k div #tokens) mod courses, so no pair repeats while
-- k < #tokens * courses.
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end

function init(args)
  nthreads = tonumber(args[1])
  tokens = {}
  for line in io.lines(args[2]) do tokens[#tokens + 1] = line end
  ncourses = tonumber(args[3])
  prefix = args[4]
  k = tid
end

function request()
  local n = #tokens
  local t = tokens[(k % n) + 1]
  local c = prefix .. (math.floor(k / n) % ncourses)
  k = k + nthreads
  return wrk.format("POST", "/v1/courses/" .. c .. "/enrollment", { ["Authorization"] = "Bearer " .. t })
end

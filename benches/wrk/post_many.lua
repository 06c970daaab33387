-- wrk script: POSTs cycling over a list of courses (the 409 path on many full courses).
-- args: <course id> [<course id> ...]
wrk.method = "POST"
function init(args)
  paths = {}
  for i, c in ipairs(args) do paths[i] = "/v1/courses/" .. c .. "/enrollment" end
  n = 0
end
function request()
  n = n % #paths + 1
  return wrk.format(nil, paths[n])
end

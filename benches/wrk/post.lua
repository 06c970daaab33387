-- wrk script: the same POST on every request (the 409 path on a full course).
wrk.method = "POST"

-- The shared queue: every queue replica changes it only through this script,
-- so each change is atomic and all replicas see one order and one capacity.
--
-- KEYS[1] is the key prefix (one hash tag, so a cluster keeps the keys in one
-- slot). ARGV[1] is the operation, then per operation:
--   enter     id class tenant weight class_cap tenant_cap lease_ms alive_ms
--   leave     id lease_ms
--   tick      lease_ms max_positions
--   renew     lease_ms alive_ms n_leases id...   (the first n_leases ids hold slots, the rest wait)
--   engines   ttl_ms reserve_share [replica slots]...
-- Times are Redis's own clock, so replicas on different hosts agree.
--
-- Keys under the prefix:
--   leases        ZSET id -> lease expiry (ms): the slots in use
--   released      ZSET id -> when it may be forgotten (ms): slots given back,
--                 which a renewal already under way must not bring back
--   alive         ZSET waiting id -> expiry (ms): a waiter whose replica stops
--                 renewing it is dropped
--   meta          HASH waiting id -> "class tenant"
--   q:C:T         LIST the waiting ids of tenant T in class C, oldest first
--   active:C      ZSET tenant -> pass, the tenants of class C with waiters
--   pass:C        HASH tenant -> pass when it last left active:C
--   vtime         HASH class -> pass of the last tenant served
--   weight        HASH tenant -> scheduling weight
--   count         HASH "class:C" / "tenant:T" -> waiting requests
--   engines       ZSET inference replica -> last seen (ms)
--   slots         HASH inference replica -> its slots
--   capacity      the sum of the slots
--   reserved      the slots batch requests leave to interactive ones
--
-- Fairness is stride scheduling: serving a tenant advances its pass by
-- 1/weight; within a class the tenant with the lowest pass goes next, so under
-- saturation tenants get slots in proportion to their weights. A tenant that
-- starts waiting again resumes at max(its old pass, the class's virtual time):
-- it can neither bank credit while idle nor be punished for being served
-- while nobody else waited.

local P = KEYS[1]
local op = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local CLASSES = {'1', '2'} -- interactive, then batch
local BATCH = '2'

local function k(...)
  return P .. ':' .. table.concat({...}, ':')
end

-- A day after the last change: a queue no replica serves any more (a local
-- stack that stopped, replicas that crashed, an old prefix) leaves nothing behind.
local KEEP_MS = 86400000
local function expire_later()
  for _, key in ipairs({k('capacity'), k('reserved'), k('engines'), k('slots'), k('pass', '1'), k('pass', '2'),
                        k('vtime'), k('weight'), k('count'), k('leases'), k('released'), k('alive'), k('meta'),
                        k('active', '1'), k('active', '2')}) do
    redis.call('PEXPIRE', key, KEEP_MS)
  end
end

local function capacity()
  return tonumber(redis.call('GET', k('capacity')) or '0')
end

-- Slots a class may not fill: batch work leaves the reserve to interactive
-- work, so that an interactive request starts at once under a batch flood
-- instead of waiting for a batch request to finish.
local function held_back(class)
  if class == BATCH then
    return tonumber(redis.call('GET', k('reserved')) or '0')
  end
  return 0
end

local function deactivate(class, tenant)
  local active = k('active', class)
  local pass = redis.call('ZSCORE', active, tenant)
  redis.call('ZREM', active, tenant)
  if pass then
    redis.call('HSET', k('pass', class), tenant, pass)
  end
end

local function uncount(field)
  -- Never below zero (a count can outlive the waiters it counted), and gone at zero.
  if redis.call('HINCRBY', k('count'), field, -1) <= 0 then
    redis.call('HDEL', k('count'), field)
  end
end

local function forget(id, class, tenant)
  redis.call('ZREM', k('alive'), id)
  redis.call('HDEL', k('meta'), id)
  uncount('class:' .. class)
  uncount('tenant:' .. tenant)
end

local function remove_waiter(id)
  local meta = redis.call('HGET', k('meta'), id)
  if not meta then
    return false
  end
  local class, tenant = string.match(meta, '(%S+) (%S+)')
  local queue = k('q', class, tenant)
  redis.call('LREM', queue, 1, id)
  forget(id, class, tenant)
  if redis.call('LLEN', queue) == 0 then
    deactivate(class, tenant)
  end
  return true
end

local function stride(tenant)
  return 1.0 / math.max(1, tonumber(redis.call('HGET', k('weight'), tenant) or '1'))
end

-- Pops the next waiter by class, then lowest pass, then arrival, given the free slots.
local function pop_next(free)
  for _, class in ipairs(CLASSES) do
    local active = k('active', class)
    local floor = held_back(class)
    while free > floor do
      local head = redis.call('ZRANGE', active, 0, 0, 'WITHSCORES')
      if #head == 0 then
        break
      end
      local tenant, pass = head[1], tonumber(head[2])
      local queue = k('q', class, tenant)
      local id = redis.call('LPOP', queue)
      redis.call('HSET', k('vtime'), class, pass)
      redis.call('ZADD', active, pass + stride(tenant), tenant)
      if redis.call('LLEN', queue) == 0 then
        deactivate(class, tenant)
      end
      if id then
        forget(id, class, tenant)
        return id
      end
    end
  end
  return nil
end

-- Drops dead leases and waiters, then fills free slots; tells every replica.
local function dispatch(lease_ms)
  redis.call('ZREMRANGEBYSCORE', k('leases'), '-inf', now)
  redis.call('ZREMRANGEBYSCORE', k('released'), '-inf', now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', k('alive'), '-inf', now)) do
    remove_waiter(id)
  end
  local free = capacity() - redis.call('ZCARD', k('leases'))
  local admitted = {}
  while free > 0 do
    local id = pop_next(free)
    if not id then
      break
    end
    redis.call('ZADD', k('leases'), now + lease_ms, id)
    admitted[#admitted + 1] = id
    free = free - 1
  end
  if #admitted > 0 then
    redis.call('PUBLISH', k('admitted'), table.concat(admitted, ' '))
  end
  return admitted
end

-- A min-heap of {pass, tenant}: ties go to the tenant whose name sorts first,
-- as ZRANGE (and so pop_next) breaks them.
local function before(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end

local function push(heap, item)
  local i = #heap + 1
  heap[i] = item
  while i > 1 do
    local parent = math.floor(i / 2)
    if not before(heap[i], heap[parent]) then
      break
    end
    heap[i], heap[parent] = heap[parent], heap[i]
    i = parent
  end
end

local function pop(heap)
  local top, n = heap[1], #heap
  heap[1] = heap[n]
  heap[n] = nil
  local i = 1
  while true do
    local smallest, left, right = i, 2 * i, 2 * i + 1
    if left < n and before(heap[left], heap[smallest]) then
      smallest = left
    end
    if right < n and before(heap[right], heap[smallest]) then
      smallest = right
    end
    if smallest == i then
      return top
    end
    heap[i], heap[smallest] = heap[smallest], heap[i]
    i = smallest
  end
end

-- The waiting ids in the order they would be served now (at most limit): the
-- tenant with the lowest pass next, each pick advancing its pass by its stride.
-- A heap keeps this O(limit log tenants); a scan of every tenant per position
-- took over 100 ms with a thousand tenants waiting, and blocked Redis meanwhile.
local function order(limit)
  local out = {}
  for _, class in ipairs(CLASSES) do
    local tenants = redis.call('ZRANGE', k('active', class), 0, -1, 'WITHSCORES')
    local queues, heads, heap = {}, {}, {}
    for i = 1, #tenants, 2 do
      local tenant = tenants[i]
      queues[tenant] = redis.call('LRANGE', k('q', class, tenant), 0, limit - #out - 1)
      heads[tenant] = 1
      if #queues[tenant] > 0 then
        push(heap, {tonumber(tenants[i + 1]), tenant})
      end
    end
    while #out < limit and #heap > 0 do
      local pass, tenant = unpack(pop(heap))
      out[#out + 1] = queues[tenant][heads[tenant]]
      heads[tenant] = heads[tenant] + 1
      if heads[tenant] <= #queues[tenant] then
        push(heap, {pass + stride(tenant), tenant})
      end
    end
  end
  return out
end

if op == 'enter' then
  local id, class, tenant, weight = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
  local class_cap, tenant_cap = tonumber(ARGV[6]), tonumber(ARGV[7])
  local lease_ms, alive_ms = tonumber(ARGV[8]), tonumber(ARGV[9])
  redis.call('ZREMRANGEBYSCORE', k('leases'), '-inf', now)
  -- A call sent again (its answer lost with a broken connection) finds the request where it is.
  if redis.call('ZSCORE', k('leases'), id) then
    return {'admitted'}
  end
  if redis.call('ZSCORE', k('alive'), id) then
    return {'waiting'}
  end
  -- Nobody waiting and a slot free: straight in (the common, unloaded case).
  local waiting = redis.call('ZCARD', k('alive'))
  if waiting == 0 and redis.call('ZCARD', k('leases')) < capacity() - held_back(class) then
    redis.call('ZADD', k('leases'), now + lease_ms, id)
    redis.call('PEXPIRE', k('leases'), KEEP_MS)
    return {'admitted'}
  end
  local counts = redis.call('HMGET', k('count'), 'class:' .. class, 'tenant:' .. tenant)
  if tonumber(counts[1] or '0') >= class_cap then
    return {'full', 'class'}
  end
  if tonumber(counts[2] or '0') >= tenant_cap then
    return {'full', 'tenant'}
  end
  redis.call('HSET', k('weight'), tenant, weight)
  redis.call('HSET', k('meta'), id, class .. ' ' .. tenant)
  redis.call('ZADD', k('alive'), now + alive_ms, id)
  redis.call('HINCRBY', k('count'), 'class:' .. class, 1)
  redis.call('HINCRBY', k('count'), 'tenant:' .. tenant, 1)
  local queue = k('q', class, tenant)
  redis.call('RPUSH', queue, id)
  redis.call('PEXPIRE', queue, KEEP_MS)
  if redis.call('LLEN', queue) == 1 then
    local vtime = tonumber(redis.call('HGET', k('vtime'), class) or '0')
    local pass = tonumber(redis.call('HGET', k('pass', class), tenant) or '0')
    redis.call('ZADD', k('active', class), math.max(vtime, pass), tenant)
  end
  local admitted = dispatch(lease_ms)
  expire_later()
  for _, other in ipairs(admitted) do
    if other == id then
      return {'admitted'}
    end
  end
  return {'waiting'}
elseif op == 'leave' then
  local id, lease_ms = ARGV[2], tonumber(ARGV[3])
  local line_changed = false
  if redis.call('ZREM', k('leases'), id) == 0 then
    line_changed = remove_waiter(id)
  end
  redis.call('ZADD', k('released'), now + lease_ms, id)
  if #dispatch(lease_ms) > 0 or line_changed then
    expire_later()
  else
    -- Every request leaves: with nobody waiting, only this key is new.
    redis.call('PEXPIRE', k('released'), KEEP_MS)
  end
  return {}
elseif op == 'tick' then
  dispatch(tonumber(ARGV[2]))
  expire_later()
  return order(tonumber(ARGV[3]))
elseif op == 'renew' then
  local lease_ms, alive_ms, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local lost = {}
  for i = 5, #ARGV do
    local id = ARGV[i]
    local key, ttl = k('leases'), lease_ms
    if i - 4 > n then
      key, ttl = k('alive'), alive_ms
    end
    if i - 4 > n and not redis.call('ZSCORE', key, id) then
      -- Admitted since the replica last looked: its lease is renewed instead.
      key, ttl = k('leases'), lease_ms
    end
    if redis.call('ZSCORE', key, id) then
      redis.call('ZADD', key, now + ttl, id)
    else
      lost[#lost + 1] = id
      if i - 4 <= n and not redis.call('ZSCORE', k('released'), id) then
        -- Still running, but its lease is gone (Redis lost its data, or this replica
        -- stalled past the lease): counted again, so that no one else gets its slot.
        redis.call('ZADD', k('leases'), now + lease_ms, id)
      end
    end
  end
  return lost
elseif op == 'engines' then
  local ttl_ms, reserve_share = tonumber(ARGV[2]), tonumber(ARGV[3])
  for i = 4, #ARGV, 2 do
    redis.call('ZADD', k('engines'), now, ARGV[i])
    redis.call('HSET', k('slots'), ARGV[i], ARGV[i + 1])
  end
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', k('engines'), '-inf', now - ttl_ms)) do
    redis.call('ZREM', k('engines'), gone)
    redis.call('HDEL', k('slots'), gone)
  end
  local total = 0
  for _, slots in ipairs(redis.call('HVALS', k('slots'))) do
    total = total + tonumber(slots)
  end
  redis.call('SET', k('capacity'), total)
  redis.call('SET', k('reserved'), math.floor(total * reserve_share))
  expire_later()
  return total
end
return redis.error_reply('unknown operation ' .. tostring(op))

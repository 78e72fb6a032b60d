-- Argo CD health check for lathe.dev/v1alpha1 Corpus, installed as the argocd-cm key
-- resource.customizations.health.lathe.dev_Corpus (docs/gitops.md). Argo CD passes the
-- resource as the global `obj` and reads `status` and `message` from the returned table.
--
-- The rules mirror lathe.status.derive_phase, so the health matches the PHASE column:
--   no status, or status.observedGeneration behind metadata.generation  -> Progressing
--   Failed=True                                                          -> Degraded
--   Succeeded=True (the summary condition)                               -> Healthy
--   Suspended=True                                                       -> Suspended
--   summary False with reason ScaledToZero (serving.replicas 0)          -> Healthy
--   anything else (waiting for an input, running, pending)               -> Progressing
-- A Triton pod that cannot start (reason PodsNotStarting) stays Progressing, as Argo CD judges
-- a Pending pod, because an unschedulable pod may wait for a node autoscaler.
-- The five lathe.dev scripts differ only in the kind and the summary condition, and
-- tests/unit/test_argocd_health.py checks that they stay that way.
local kind = "Corpus"
local summary = "Succeeded"

local function find_condition(conditions, condition_type)
  for _, condition in ipairs(conditions) do
    if condition.type == condition_type then
      return condition
    end
  end
  return nil
end

local function is_true(condition)
  return condition ~= nil and condition.status == "True"
end

-- The condition's message, else its reason, else the fallback.
local function describe(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if condition ~= nil and condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason
  end
  return fallback
end

-- NB: Argo CD's Lua (gopher-lua) holds JSON numbers as floats; %d after math.floor prints
-- them without a decimal point there and in Lua 5.4.
local function integer(value)
  return string.format("%d", math.floor(value))
end

-- "step 120 of 300" from status.progress, or nil before the first progress record.
local function describe_progress(progress)
  if progress == nil or progress.step == nil then
    return nil
  end
  if progress.totalSteps ~= nil then
    return "step " .. integer(progress.step) .. " of " .. integer(progress.totalSteps)
  end
  return "step " .. integer(progress.step)
end

local function evaluate(resource)
  local status = resource.status
  local generation = resource.metadata.generation
  local observed = nil
  if status ~= nil then
    observed = status.observedGeneration
  end
  if observed == nil then
    return "Progressing", "Waiting for the Lathe operator to reconcile this " .. kind .. "."
  end
  if generation ~= nil and observed < generation then
    return "Progressing", "Waiting for the Lathe operator to reconcile generation "
      .. integer(generation) .. "; status describes generation " .. integer(observed) .. "."
  end

  local conditions = status.conditions or {}
  local failed = find_condition(conditions, "Failed")
  if is_true(failed) then
    return "Degraded", describe(failed, kind .. " failed.")
  end
  local done = find_condition(conditions, summary)
  if is_true(done) then
    return "Healthy", describe(done, summary .. ".")
  end
  local suspended = find_condition(conditions, "Suspended")
  if is_true(suspended) then
    return "Suspended", describe(suspended, kind .. " is suspended.")
  end
  local inputs = find_condition(conditions, "InputsReady")
  if inputs ~= nil and inputs.status == "False" then
    return "Progressing", describe(inputs, "Waiting for inputs.")
  end
  local running = find_condition(conditions, "Running")
  if is_true(running) then
    local message = describe(running, "Running.")
    local step = describe_progress(status.progress)
    if step ~= nil then
      message = "Running " .. step .. ". " .. message
    end
    return "Progressing", message
  end
  if done ~= nil and done.reason == "ScaledToZero" then
    -- Serving turned off on purpose, as Argo CD judges a Deployment scaled to zero.
    return "Healthy", describe(done, kind .. " is scaled to zero.")
  end
  if done ~= nil then
    -- A served model whose Triton replicas are not, or no longer, all ready.
    return "Progressing", describe(done, "Waiting for " .. summary .. ".")
  end
  if running ~= nil then
    return "Progressing", describe(running, "Waiting for the workload to start.")
  end
  return "Progressing", "Waiting for the Lathe operator to start the workload."
end

local health = {}
health.status, health.message = evaluate(obj)
return health

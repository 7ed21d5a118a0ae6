-- Argo CD health check for vmops.dev/VMMigration (resource.customizations.health.vmops.dev_VMMigration).
-- Reads what the operator writes: observedGeneration, phase, progress, conditions
-- (Ready/Degraded and the kstatus Reconciling/Stalled).
local hs = {}

local function condition(t)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == t then return c end
    end
  end
  return nil
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the migration"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = string.format("Waiting for the operator to act on generation %d (status is for %d)", generation, observed)
  return hs
end

local phase = obj.status.phase
local ready = condition("Ready")
local stalled = condition("Stalled")
local degraded = condition("Degraded")
local message = obj.status.message or ""

if phase == "Succeeded" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or message
  return hs
end
if phase == "Failed" or (stalled ~= nil and stalled.status == "True") or (degraded ~= nil and degraded.status == "True") then
  hs.status = "Degraded"
  if ready ~= nil and ready.message ~= nil then hs.message = ready.message else hs.message = message end
  return hs
end
if phase == "Paused" then
  hs.status = "Suspended"
  hs.message = "Paused (spec.paused): " .. (obj.status.progress or "0") .. " VM(s) done"
  return hs
end
hs.status = "Progressing"
local progress = obj.status.progress or "0/?"
if obj.status.currentVM ~= nil and obj.status.currentVM ~= "" then
  hs.message = string.format("%s: %s VM(s) done, moving %s", phase, progress, obj.status.currentVM)
else
  hs.message = string.format("%s: %s VM(s) done", phase, progress)
end
return hs

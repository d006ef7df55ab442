"""The planners: observed state and a clock in, actions out. No I/O (import-linter enforces it).

Each kind has its planner module (:mod:`.train` for CheapTrainJob); what every kind needs
(preemption signals and their classification, conditions, the actions that touch pods and
events) lives in :mod:`.preemption`, :mod:`.conditions` and :mod:`.actions`, so no planner
copies another.
"""

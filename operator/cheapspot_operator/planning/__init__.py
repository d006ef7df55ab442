"""The planners' shared decisions: observed state and a clock in, actions out. No I/O
(import-linter enforces it).

Each kind has its planner (:mod:`cheapspot_operator.trainjob.plan`,
:mod:`cheapspot_operator.inferencepool.plan`); what every kind decides the same way lives here,
so no planner copies another: a slot's life (:mod:`.slots`: fresh attempts, adoption,
preemptions, the fallback after waiting for spot), preemption signals and their
classification (:mod:`.preemption`), fallback timing (:mod:`.fallback`), budgets
(:mod:`.budget`), cost accounting (:mod:`.costing`), the deadline policies (:mod:`.deadline`),
conditions (:mod:`.conditions`) and the actions that touch pods and events (:mod:`.actions`).
"""

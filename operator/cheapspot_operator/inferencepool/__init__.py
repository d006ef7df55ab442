"""The CheapInferencePool: what it observes, its plan, its pods, the replicas' admin client and its controller."""

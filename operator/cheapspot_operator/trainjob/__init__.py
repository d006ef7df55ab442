"""The CheapTrainJob: what it observes, its plan, its pods, and its controller."""

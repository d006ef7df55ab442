"""cheapspot operator: watches CheapTrainJob and CheapInferencePool, plans, acts. Never imports torch."""

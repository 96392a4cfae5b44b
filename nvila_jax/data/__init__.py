"""Host-side training data: LLaVA-style records, mixtures, label masking, packing and the grain pipeline."""

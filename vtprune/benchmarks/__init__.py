"""Benchmarks: synthetic data, MME and GQA loaders and scorers, prompts, tiny LLaVA."""

"""Evaluation: perplexity with the GPTQ/AWQ protocol (lm-eval bridge comes later)."""

from lwq.eval.perplexity import PerplexityResult, perplexity, perplexity_of_text

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_text"]

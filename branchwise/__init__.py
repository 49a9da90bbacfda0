"""branchwise: an OpenAI-compatible LLM server whose decoding strategy is a plug-in."""

from branchwise.engine.sequence import RequestOutput, SamplingParams
from branchwise.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"

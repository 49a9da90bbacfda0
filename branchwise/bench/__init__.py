"""`branchwise bench`: offline strategy comparisons and online load against any OpenAI-compatible server."""

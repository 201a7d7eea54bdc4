"""`afd bench`: a load generator for any OpenAI-compatible server, and the statistics, reports
and plots of what it measured. It talks HTTP only, so it measures this system and any other
server (vLLM, SGLang, TGI) the same way."""

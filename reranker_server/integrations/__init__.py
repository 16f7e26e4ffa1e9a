"""Framework integrations, each behind its own extra; this package imports none of them.

- `reranker_server.integrations.mem0`: a mem0 reranker provider (`reranker-server[mem0]`)
- `reranker_server.integrations.langchain`: a LangChain document compressor (`[langchain]`)
- `reranker_server.integrations.llamaindex`: a LlamaIndex node postprocessor (`[llamaindex]`)

All three talk to the server through `reranker_server.client`.
"""

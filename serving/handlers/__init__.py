"""One handler per endpoint, as vLLM's ``entrypoints/openai`` lays them out.

A handler takes the :class:`serving.replica.Replica` and the parsed request
(:mod:`serving.schemas`), plans the request against the deployment's limits
(:mod:`serving.handlers.plan`), runs it on the replica's engine loop and returns the declared
pydantic response model (or server-sent events of the declared chunk model). The routes in
:mod:`serving.api` only bind paths to handlers.
"""

"""The Ray Serve application: one FastAPI-ingress deployment around a :class:`Replica`.

    serve run serving.app:build_app          # args from the CLI / a config file's ``args``
    serve deploy serve_config.yaml           # written by the deploy stage (serving/deploy/)

Serve routes requests to a replica only once its constructor has returned, and the constructor
waits for the first load: a new replica (scale-up, rolling update) takes no traffic before it is
warm. ``reconfigure`` (a ``serve deploy`` of an edited ``user_config``) loads a new version beside
the serving one and switches when it is warm; a ``serve.run`` redeploy from Python is a rolling
update. Everything else a replica does lives in :mod:`serving.replica`, which the benchmark runs
without Serve.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ray import serve
from ray.serve import Application

from components.config import Config, config_from_dict
from serving.deploy.config import DEPLOYMENT_NAME, deployment_options
from serving.middleware import token_from_env
from serving.model_store import resolved_model_uri
from serving.replica import Replica


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class CompletionServer:
    async def __init__(self, config: Config):
        replica_id = str(serve.get_replica_context().replica_tag)
        self.replica = Replica(config, replica_id, ray_metrics=True)
        # a new replica takes requests only when warm; if the model cannot be loaded yet (no
        # alias), it starts anyway, alive but unready, and keeps retrying
        await self.replica.start()

    def __serve_build_asgi_app__(self):
        from serving.api import build_asgi_app

        return build_asgi_app(self.replica)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with ``user_config`` at start and whenever it changes (in place)."""
        await self.replica.reconfigure(user_config)

    def check_health(self) -> None:
        self.replica.check_health()

    def __del__(self):
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.close()


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder.

    ``args`` is either the plain config container (a Serve config file written by the deploy
    stage, a RayService) or, from the command line, Hydra overrides as ``key=value`` pairs:
    ``serve run serving.app:build_app experiment=tiny tracking.uri=sqlite:////abs/mlflow.db``.
    """
    if isinstance(args.get("serve"), dict):
        config = config_from_dict(dict(args))
    else:
        from components.config import load_config

        config = load_config([f"{key}={value}" for key, value in args.items()])
    return make_application(config, model_uri=config.serve.model_uri or None)


def make_application(
    config: Config, model_uri: str | None = None, revision: str = ""
) -> Application:
    """The bound application with the same deployment options the Serve config file carries.

    The replicas get the typed config as it is (pickled by Ray), with ``serve.model_uri`` set.
    """
    options = deployment_options(config, model_uri, revision)
    options.pop("name")
    token_env = config.serve.auth_token_env
    if token_from_env(token_env):
        # The token reaches replicas as an env var of their runtime env, never through a config
        # file.
        options["ray_actor_options"] = {
            **options["ray_actor_options"],
            "runtime_env": {"env_vars": {token_env: os.environ[token_env]}},
        }
    deployment = CompletionServer.options(**options)
    served = dataclasses.replace(
        config,
        serve=dataclasses.replace(config.serve, model_uri=resolved_model_uri(config, model_uri)),
    )
    # serve.run from Python gives the deployment a new version on every call, so a redeploy (new
    # user_config included) is a rolling update: replacements start beside the serving replicas
    # (serve.max_surge_percent) and take traffic only once their model is loaded and warm. Pinning
    # the version would make it an in-place reconfigure, but Serve offers that from Python only
    # through a private flag; `serve deploy` of the config file (serving.deploy.config) updates
    # user_config in place through the public path.
    return deployment.bind(served)

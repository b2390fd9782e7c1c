"""``GET /v1/models``: every served model id, its version, alias and share of default traffic."""

from __future__ import annotations

import time

from serving.schemas import ModelCard, ModelList


def list_models(replica) -> ModelList:
    created = int(time.time())
    return ModelList(
        data=[
            ModelCard(
                id=card_id,
                created=created,
                version=served.version,
                alias=served.role,
                traffic_share=share,
                max_model_len=served.engine.max_seq_len,
            )
            for card_id, served, share in replica.store.cards()
        ]
    )

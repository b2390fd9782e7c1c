"""``POST /tokenize`` and ``POST /detokenize``, as vLLM has them: the served model's tokenizer
(a chat ``messages`` list is rendered with the chat template first)."""

from __future__ import annotations

from serving import chat_template
from serving.handlers.common import served_for
from serving.handlers.plan import check_token_ids
from serving.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse


def tokenize(replica, body: TokenizeRequest) -> TokenizeResponse:
    engine = served_for(replica, body.model).engine
    # the template always ends with the assistant header unless the last message is the
    # assistant's, so add_generation_prompt has nothing to add or remove
    text = body.prompt if body.prompt is not None else chat_template.render(body.messages)
    ids = engine.encode(text)
    return TokenizeResponse(
        count=len(ids),
        max_model_len=engine.max_seq_len,
        tokens=ids,
        token_strs=[engine.tokenizer.decode([t]) for t in ids] if body.return_token_strs else None,
    )


def detokenize(replica, body: DetokenizeRequest) -> DetokenizeResponse:
    engine = served_for(replica, body.model).engine
    check_token_ids(body.tokens, engine.vocab_size, "tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

"""Request bodies, and the checks a prediction request passes before it joins a batch.

Every refusal is made here, on the request alone, so that a bad request never reaches the
batch that other requests share.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..core.errors import ConfigError, DeltatuneError
from ..tasks.base import Encoded
from .errors import ServeError, TooLarge
from .registry import Served

#: an example body per route, for the hint of a malformed request
EXAMPLES = {
    "/v1/predict": '{"adapter": "NAME", "inputs": ["a text", "another text"]}',
    "/v1/adapters": '{"name": "NAME", "path": "runs/NAME"}',
}


@dataclass(frozen=True)
class Settings:
    """How requests are batched, and what one request may ask for."""

    max_inputs: int = 64  # inputs per request
    max_input_chars: int = 10_000  # characters of one input (a row: of all its texts)
    max_batch: int = 32  # rows in one batch (a request with more rows runs alone)
    max_wait_ms: float = 10.0  # how long a request waits for others to fill its batch

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            smallest = 0 if key == "max_wait_ms" else 1
            if value < smallest:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(f"{flag} {value}: it must be at least {smallest}.",
                                  f"e.g. {flag} {getattr(Settings, key)}")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str
    inputs: list[Any]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


def check_inputs(inputs: list[Any], settings: Settings) -> None:
    """Refuse no inputs, too many, and any input that is empty, too long or of no readable kind.

    Raises:
        ServeError (400) or TooLarge (413), naming the input.
    """
    if not inputs:
        raise ServeError("the request has no inputs.", 'send at least one: "inputs": ["a text"].')
    if len(inputs) > settings.max_inputs:
        raise TooLarge(f"the request has {len(inputs)} inputs; this server takes at most {settings.max_inputs}.",
                       "split them over several requests.")
    for i, item in enumerate(inputs):
        if not isinstance(item, (str, list, dict)):
            raise ServeError(f"inputs[{i}] is {item!r}: neither a text, a list of words nor a row.",
                             'send texts, lists of words, or rows such as {"question": ..., "context": ...}.')
        texts = list(_texts(item))
        if not any(t.strip() for t in texts):
            raise ServeError(f"inputs[{i}] is empty.", "send some text in every input.")
        if sum(map(len, texts)) > settings.max_input_chars:
            raise TooLarge(f"inputs[{i}] has {sum(map(len, texts)):,} characters; this server takes at most "
                           f"{settings.max_input_chars:,}.", "shorten or split it.")


def _texts(item: Any) -> Iterator[str]:
    """The strings inside an input: itself, a list's items, a row's values."""
    if isinstance(item, str):
        yield item
    elif isinstance(item, (list, dict)):
        for value in item.values() if isinstance(item, dict) else item:
            yield from _texts(value)


def encode(served: Served, inputs: list[Any]) -> Encoded:
    """The inputs as the adapter's own run reads them (its columns, its max_length).

    Raises:
        ServeError: the run's task cannot read them (a qa row without a context, a bare text for
            a sentence-pair classifier).
    """
    try:
        return served.task.encode(served.instance.tokenizer, inputs)
    except (DeltatuneError, KeyError, TypeError, ValueError) as error:
        message = error.message if isinstance(error, DeltatuneError) else f"{type(error).__name__}: {error}"
        raise ServeError(f"adapter '{served.name}' ({served.task.name}) cannot read these inputs: {message}",
                         "send inputs with the columns its run was trained on.") from error

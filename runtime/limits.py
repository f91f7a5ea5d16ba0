"""Limits on untrusted input, one documented setting each (torch-free).

Every limit is checked before any expensive work starts, and a request or workflow over a limit is
refused with a message that names the setting (HTTP 400 on the server, exit 2 on the CLI). The
defaults are generous for real SDXL use; `sdxl-nodes run/serve --limit NAME=VALUE` changes one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    # characters in one text widget (a prompt); ComfyUI has none, a 10 MB prompt stalls the worker
    prompt_chars: int = 200_000
    # characters in a SaveImage/PreviewImage filename_prefix
    filename_prefix_chars: int = 256
    # nesting depth of any JSON body or workflow file
    json_depth: int = 64
    # decimal digits of any integer in a JSON body or workflow file (a 64-bit seed has 20)
    int_digits: int = 32
    # bytes of one HTTP request body (all multipart fields together for an upload)
    request_bytes: int = 128 * 2**20
    # pixels of one image a node or the server decodes (uploaded, loaded or previewed)
    image_pixels: int = 8192 * 8192
    # pixels of one latent batch to be sampled: width × height × batch_size
    latent_pixels: int = 4096 * 4096 * 4

    def replace(self, **changes) -> "Limits":
        return dataclasses.replace(self, **changes)


DEFAULT_LIMITS = Limits()


def parse_limits(options: list[str] | None, base: Limits = DEFAULT_LIMITS) -> Limits:
    """``["image_pixels=100000000", ...]`` applied to ``base``; ValueError names what is wrong."""
    names = [f.name for f in dataclasses.fields(Limits)]
    changes: dict[str, int] = {}
    for option in options or ():
        name, sep, value = option.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            raise ValueError(f"--limit {option!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
        try:
            number = int(value.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"--limit {option!r}: the value must be a whole number") from None
        if number < 1:
            raise ValueError(f"--limit {option!r}: the value must be at least 1")
        changes[name] = number
    return base.replace(**changes)

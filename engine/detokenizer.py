"""Incremental detokenization for streaming, with stop strings.

Decoding one token at a time is wrong for byte-level BPE (an emoji may span several tokens, each decoding to
U+FFFD alone) and for SentencePiece-style decoders (a token's leading space depends on what precedes it).
So, as vLLM and TGI do, each step decodes a short sliding window of recent tokens twice:

    prefix_text = decode(ids[prefix_offset:read_offset])   # already turned into text
    new_text    = decode(ids[prefix_offset:])              # the same plus the tokens not yet committed

and commits ``new_text[len(prefix_text):]``. While ``new_text`` ends with U+FFFD the last character may still
be incomplete: the complete part before it is committed and the window is kept until the character is whole
(the offsets only advance when the window text ends cleanly). Cost per step is the window, not the sequence.

Stop strings are searched only in the newly committed text plus the last ``max(len(stop)) - 1`` characters
before it. ``emittable_text`` holds back any tail of the text that is a proper prefix of a stop string, so a
stream never shows a stop string that completes later (unless include_stop_str_in_output).

The engine should not append the EOS / stop token itself if its text must not appear (special tokens are
skipped anyway with skip_special_tokens=True, the default), and calls ``finish()`` when the sequence ends
for any reason other than a stop string, which releases everything held back.
"""

from __future__ import annotations

from typing import Any

from .sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first output token, so its leading space / merge is decoded in context.
PROMPT_CONTEXT_TOKENS = 5
# A window that never ends cleanly (a run of invalid bytes) is committed as it is after this many tokens, to
# keep each step's decode bounded. A UTF-8 character is at most 4 bytes, so only a run of >= 29 tokens that
# add no bytes (skipped special tokens) between a character's bytes could make this commit wrong.
MAX_PENDING_TOKENS = 32


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text, one token at a time.

    tokenizer: anything with ``decode(ids, skip_special_tokens=...)`` (a transformers tokenizer or a
    ``tokenizers.Tokenizer``)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._params = params
        self._decode_kwargs: dict[str, Any] = {"skip_special_tokens": params.skip_special_tokens}
        if hasattr(tokenizer, "clean_up_tokenization_spaces"):
            # transformers' clean-up rewrites " ." to "." and so on across token boundaries; it would make a
            # window's text depend on tokens after it. Off, so streamed text equals the final text.
            self._decode_kwargs["clean_up_tokenization_spaces"] = False

        self._stops = list(params.stop)
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._stop_prefixes = {s[:k] for s in self._stops for k in range(1, len(s))}

        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context) if context else ""
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character; decoding outputs in its context would mix the two. Decode
            # the outputs on their own, as tokenizer.decode(output_ids) would.
            context, context_text = [], ""
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = context_text
        self._window_committed = 0  # chars of the current window's new text already committed
        self._pending = ""  # uncommitted tail of the window's text (U+FFFD of an unfinished character)

        self._pieces: list[str] = []  # committed text
        self._length = 0
        self._tail = ""  # last max_stop_len - 1 committed chars (stop search and hold-back)
        self._holdback = 0  # chars at the end of the committed text that could start a stop string
        self._text_cache: str | None = ""
        self._taken = 0  # chars handed out by take_delta()

        self.num_output_tokens = 0
        self.stopped_by: str | None = None
        self.finished = False

    # ----- public ---------------------------------------------------------------------------------------

    def append(self, token_id: int) -> None:
        """Add one output token. Sets ``stopped_by`` when a stop string completes."""
        if self.finished:
            raise RuntimeError("IncrementalDetokenizer.append after the sequence finished")
        self._ids.append(int(token_id))
        self.num_output_tokens += 1

        new_text = self._decode(self._ids[self._prefix_offset:])
        added = new_text[len(self._prefix_text) + self._window_committed:] if len(new_text) > len(self._prefix_text) else ""
        pending_tokens = len(self._ids) - self._read_offset
        if new_text.endswith(REPLACEMENT_CHAR) and pending_tokens < MAX_PENDING_TOKENS:
            complete = added.rstrip(REPLACEMENT_CHAR)
            self._pending = added[len(complete):]
            self._window_committed += len(complete)
            self._commit(complete)
        else:
            self._pending = ""
            self._window_committed = 0
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
            # Drop ids before the window; keeps memory O(window) for long outputs.
            if self._prefix_offset > 4 * MAX_PENDING_TOKENS:
                del self._ids[: self._prefix_offset]
                self._read_offset -= self._prefix_offset
                self._prefix_offset = 0
            self._commit(added)

    def finish(self) -> None:
        """The sequence ended (EOS, stop token, length): everything held back becomes final and emittable."""
        self.finished = True

    @property
    def text(self) -> str:
        """All text of the output so far, stop string trimmed (kept with include_stop_str_in_output). An
        unfinished trailing character shows as U+FFFD, as tokenizer.decode would show it."""
        if self._text_cache is None:
            self._text_cache = "".join(self._pieces)
        return self._text_cache + self._pending

    @property
    def emittable_length(self) -> int:
        if self.finished:
            return self._length + len(self._pending)
        return self._length - self._holdback

    @property
    def emittable_text(self) -> str:
        """The prefix of ``text`` that is safe to stream now: it never changes later. Excludes an unfinished
        character and a tail that may still grow into a stop string; everything once finished or stopped."""
        return self.text[: self.emittable_length]

    def take_delta(self) -> str:
        """Emittable text not returned by an earlier take_delta() call (for streaming)."""
        end = self.emittable_length
        if end <= self._taken:
            return ""
        # Walk back over the last committed pieces only: O(delta), not O(text).
        parts = [self._pending]
        position = self._length
        for piece in reversed(self._pieces):
            if position <= self._taken:
                break
            parts.append(piece)
            position -= len(piece)
        recent = "".join(reversed(parts))  # text[position:]
        delta = recent[self._taken - position: end - position]
        self._taken = end
        return delta

    # ----- internals ------------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, **self._decode_kwargs)

    def _commit(self, piece: str) -> None:
        if not piece:
            return
        start = self._length - len(self._tail)  # position of the search window in the whole text
        window = self._tail + piece
        self._pieces.append(piece)
        self._length += len(piece)
        self._text_cache = None

        match = self._find_stop(window)
        if match is not None:
            position, stop = match
            end = start + position + (len(stop) if self._params.include_stop_str_in_output else 0)
            text = self.text[:end]
            self._pieces, self._length, self._text_cache = [text], len(text), text
            self._pending = ""
            self._holdback = 0
            self.stopped_by = stop
            self.finished = True
            return

        keep = self._max_stop_len - 1
        self._tail = window[-keep:] if keep > 0 else ""
        self._holdback = self._stop_prefix_suffix(self._tail)

    def _find_stop(self, window: str) -> tuple[int, str] | None:
        """Earliest stop string in window (ties: the shorter one, which completed first)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            position = window.find(stop)
            if position < 0:
                continue
            if best is None or (position, position + len(stop)) < (best[0], best[0] + len(best[1])):
                best = (position, stop)
        return best

    def _stop_prefix_suffix(self, tail: str) -> int:
        """Length of the longest suffix of tail that is a proper prefix of some stop string."""
        for length in range(min(len(tail), self._max_stop_len - 1), 0, -1):
            if tail[-length:] in self._stop_prefixes:
                return length
        return 0

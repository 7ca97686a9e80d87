"""A choice's text as its tokens arrive: cut at the first stop string, and streamed so that the
pieces sent add up to exactly the text a non-streamed answer has.

A piece is held back while it could still change: the end of the text that could be the start of
a stop string, and an incomplete UTF-8 character (decoded as U+FFFD until its last byte comes).
"""

REPLACEMENT = "\ufffd"


class StopText:
    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.sent = ""  # the text handed out so far, always a prefix of the final text
        self.text = ""  # the text so far, cut at a stop string

    def _held(self, text: str) -> int:
        """How many characters at the end of text must wait for more tokens."""
        held = len(text) - len(text.rstrip(REPLACEMENT))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held

    def update(self, ids: list[int], final: bool = False) -> tuple[str, bool]:
        """The new piece of text to send after ids, and whether a stop string ended the choice
        (then, or when final, everything left is sent)."""
        text = self.tokenizer.decode(ids)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        stopped = bool(cuts)
        if stopped:
            text = text[:min(cuts)]
        self.text = text
        ready = text if stopped or final else text[:len(text) - self._held(text)]
        if not ready.startswith(self.sent):  # an earlier character changed: wait for the end
            return "", stopped
        piece, self.sent = ready[len(self.sent):], ready
        return piece, stopped

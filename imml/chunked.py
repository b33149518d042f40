"""
The sizes a chunked request body declares, read ahead of twisted.web's own
decoder: twisted.web hands a request each chunk's data as it arrives, never
the size the chunk declared, so a body declared far over the limit (a chunk
of 2**80 bytes) would otherwise wait for data that never comes.
"""

from __future__ import annotations

#: A chunk-size line longer than this is not followed (twisted.web refuses
#: lines of more than 1024 bytes itself).
_MAX_LINE = 4096


class DeclaredChunks:
    """
    Follows the framing of one chunked body (RFC 9112, 7.1) as its bytes
    arrive, and adds up the chunk sizes declared so far (L{declared}).

    It only reads: twisted.web's decoder still decodes the body, and refuses
    what is malformed.  It stops (L{done}) at the last chunk (size 0, whose
    trailers are twisted.web's business) or at a size line it cannot read,
    which twisted.web refuses in turn.  It never reads a size smaller than
    twisted.web does: Python's C{int(text, 16)} accepts more than the
    grammar allows, never less.
    """

    def __init__(self) -> None:
        self.declared = 0
        self.done = False
        #: The start of a size line, received so far.
        self._line = b""
        #: Bytes of chunk data (and its closing CRLF) still to pass over.
        self._skip = 0

    def feed(self, data: bytes) -> int:
        """
        Read the next bytes of the body; the total declared so far.
        """
        at, end = 0, len(data)
        while at < end and not self.done:
            if self._skip:
                step = min(self._skip, end - at)
                self._skip -= step
                at += step
                continue
            # Look no further than a size line can be: many small chunks in
            # one read must not cost a copy of the rest of it each.
            held = len(self._line)
            piece = self._line + data[at : at + _MAX_LINE + 2]
            eol = piece.find(b"\r\n")
            if eol == -1:
                if len(piece) > _MAX_LINE:
                    self.done = True
                else:
                    self._line = piece
                return self.declared
            self._line = b""
            at += eol + 2 - held
            try:
                size = int(piece[:eol].split(b";", 1)[0], 16)
            except ValueError:
                self.done = True
                break
            if size <= 0:
                self.done = True
                break
            self.declared += size
            self._skip = size + 2
        return self.declared


__all__ = ["DeclaredChunks"]

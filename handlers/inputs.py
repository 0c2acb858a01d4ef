"""What a request brings: its body as TorchServe passes it (raw bytes, a multipart form, base64 text), its headers,
and the error that refuses it with a 4xx naming the problem. Every handler reads its requests through these."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

PAYLOAD_KEYS = ("data", "body")
FORM_HEADER = "X-Original-Content-Type"  # set by the front door on the multipart and form bodies it relabels
MESSAGE_CHARS = 1000  # an error message is cut to this many characters (it may quote the input)
PHRASE_CHARS = 200  # the HTTP reason phrase: the message in printable ASCII, cut to this many characters
NOT_PHRASE = re.compile(r"[^\x20-\x7e]+")  # what a reason phrase may not hold (TorchServe fails on \r and \n)


class InputError(Exception):
    """A request the handler cannot serve because of its input: answered with ``status`` (4xx) and a reason (500
    ``internal_error`` for a failure no layer foresaw, see ``ModelHandler.refusals``)."""

    def __init__(self, reason: str, message: str, status: int = 400):
        message = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status

    @property
    def phrase(self) -> str:
        """The message as an HTTP reason phrase: printable ASCII, one line, at most PHRASE_CHARS characters."""
        return NOT_PHRASE.sub(" ", self.message)[:PHRASE_CHARS].strip() or self.reason

    def body(self) -> dict[str, Any]:
        return {"code": self.status, "error": self.reason, "message": self.message}


def some_keys(keys, count: int = 5, chars: int = 20) -> str:
    """A few of the keys a client sent, each cut short, for an error message (never a whole million of them)."""
    shown = [repr(str(key)[:chars]) for _, key in zip(range(count), keys)]
    return ", ".join(shown) + (", ..." if len(keys) > count else "")


def no_file(names) -> InputError:
    return InputError("no_file", f"the request has form fields ({some_keys(names)}) but no file: send the raw file "
                                 "(curl -T file) or a multipart upload (curl -F data=@file)")


def request_value(row: Any) -> Any:
    """The request body as TorchServe passes it: bytes, or text / parsed JSON when the client said so."""
    value = row
    if isinstance(row, dict):
        keys = [key for key in PAYLOAD_KEYS if key in row]  # present with None: a JSON null body, read as empty
        value = next((row[key] for key in keys if row[key] is not None), None)
        if not keys:  # a multipart upload under another field name: take its first file
            value = next((v for v in row.values() if isinstance(v, (bytes, bytearray))), None)
            if value is None and row:
                raise no_file(row)
    return value


def payload_of(row: Any) -> bytes:
    """The request body as bytes: raw body, multipart field, or base64 text."""
    value = request_value(row)
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("not_base64", "the body is text, but not base64: send the raw file or its base64")
    if isinstance(value, dict):
        raise InputError("unexpected_json", "the body is a JSON object; send the raw file (curl -T file) or multipart")
    if value is None or (isinstance(value, (bytes, bytearray)) and not value):
        raise InputError("empty_body", "the request has an empty body; send the input as the body or a multipart file")
    if not isinstance(value, (bytes, bytearray)):
        raise InputError("unreadable_body", f"cannot read a {type(value).__name__} body (JSON that is not an "
                                            "object): send the raw file (curl -T file) or multipart")
    return bytes(value)


def request_header(context, idx: int, name: str) -> str | None:
    """A request header by name, whatever its case (TorchServe passes the names as the client or proxy wrote them)."""
    for key in (name, name.lower()):
        value = context.get_request_header(idx, key)
        if isinstance(value, str):
            return value
    wanted = name.lower()
    headers = context.get_all_request_header(idx) or {}
    return next((value for key, value in headers.items()
                 if isinstance(key, str) and key.lower() == wanted and isinstance(value, str)), None)


def bad_multipart(problem: str) -> InputError:
    return InputError("bad_multipart", f"the body is not multipart/form-data as its Content-Type says: {problem}")


class FormParts:
    """The parts of one multipart/form-data body, read with python-multipart's streaming parser: for each part its
    name, whether it is a file (has a filename) and its bytes. At most ``max_parts`` parts."""

    def __init__(self, max_parts: int):
        self.max_parts = max_parts
        self.parts: list[dict[str, Any]] = []
        self.header: list[bytes] = [b"", b""]
        self.ended = False

    def read(self, body: bytes, content_type: str) -> list[tuple[str, bool, bytes]]:
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser, parse_options_header

        boundary = parse_options_header(content_type.encode("utf-8", "surrogateescape"))[1].get(b"boundary")
        if not boundary:
            raise bad_multipart("its Content-Type names no boundary")
        start = body.find(b"--" + boundary)
        if start > 0 and body[start - 2:start] == b"\r\n":  # a preamble before the first boundary (RFC 2046)
            body = body[start:]
        callbacks = {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                     "on_header_value": self.header_value, "on_header_end": self.header_end,
                     "on_part_data": self.part_data, "on_end": self.end}
        try:
            MultipartParser(boundary, callbacks).write(body)
        except FormParserError as error:
            raise bad_multipart(str(error)[:200])
        if not self.ended:
            raise bad_multipart(f"it ends before its closing boundary (--{boundary.decode('latin-1')[:70]}--)")
        if not self.parts:
            raise bad_multipart("it has no parts")
        parsed = []
        for part in self.parts:
            kind, options = parse_options_header(part.get("content-disposition", b""))
            if kind.lower() != b"form-data" or not options.get(b"name"):
                raise bad_multipart("a part has no Content-Disposition: form-data; name=...")
            is_file = b"filename" in options or re.search(rb";\s*filename\*\s*=", part["content-disposition"], re.I)
            parsed.append((options[b"name"].decode("utf-8", "replace"), bool(is_file), b"".join(part["data"])))
        return parsed

    def part_begin(self) -> None:
        if len(self.parts) == self.max_parts:
            raise InputError("bad_multipart", f"the form has more than {self.max_parts} parts (max_form_parts)")
        self.parts.append({"data": []})

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header[0] += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.header[1] += data[start:end]

    def header_end(self) -> None:
        name, value = self.header
        self.parts[-1][name.decode("latin-1").strip().lower()] = value.strip()
        self.header = [b"", b""]

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1]["data"].append(data[start:end])

    def end(self) -> None:
        self.ended = True


def form_payload(body: bytes, content_type: str, max_parts: int) -> bytes:
    """The payload of a multipart/form-data body: the part named ``data``, else ``body``, else the first file part;
    the rule ``request_value`` applies to a form TorchServe parsed. 400 ``bad_multipart`` or ``no_file``."""
    parts = FormParts(max_parts).read(body, content_type)
    named = {name: data for name, _, data in parts}  # a repeated name: the last one, as TorchServe does
    for key in PAYLOAD_KEYS:
        if key in named:
            return named[key]
    first_file = next((data for _, is_file, data in parts if is_file), None)
    if first_file is None:
        raise no_file(named)
    return first_file

"""Sending a run's inputs and shipped modules: hashed once, only what the account lacks sent,
small files inline in the submission when the server allows it. Shared by `rgrid run` and
`rgrid run --batch`."""

from __future__ import annotations

from rgrid.cli.output import note, progress
from rgrid.client.protocol import Client
from rgrid.core.units import human_bytes
from rgrid.store.inputs import InputFile, hash_files


def send_inputs(
    client: Client,
    files: list[InputFile],
    json_mode: bool,
    sources: list[InputFile] = (),
    verbose: bool = False,
    inline: list[dict] | None = None,
) -> tuple[int, int]:
    """Hash every input and shipped module, ask which digests the account lacks (one request
    for both), send only those (each distinct content once). Given an ``inline`` list, the
    smallest of them, up to the server's inline budget in all, are appended to it
    (``{sha256, data}``, base64) for the submission's own body, as remote build clients batch
    small blobs into one request: an edited module then costs no upload round trips. The
    rest are uploaded. Returns (files sent, bytes sent)."""
    both = [*sources, *files]
    total = sum(item.size for item in both)
    with progress("hashing inputs", total) as advance:
        hash_files(both, advance)
    missing = set(client.missing([item.sha256 for item in both]))
    to_send = list({item.sha256: item for item in both if item.sha256 in missing}.values())
    sent_bytes = sum(item.size for item in to_send)
    budget = getattr(client, "inline_bytes", 0) if inline is not None else 0
    to_upload = _carry_inline(to_send, budget, inline) if budget else to_send
    with progress("uploading inputs", sum(item.size for item in to_upload)) as advance:
        for item in to_upload:
            client.upload(item, advance)
    if not json_mode:
        _report(files, sources, to_send, inline, verbose)
    return len(to_send), sent_bytes


def _carry_inline(to_send: list[InputFile], budget: int, inline: list[dict]) -> list[InputFile]:
    """Append the smallest of ``to_send`` to ``inline``, up to ``budget`` bytes in all;
    returns the rest, to be uploaded."""
    import base64
    import hashlib

    to_upload = []
    for item in sorted(to_send, key=lambda item: item.size):
        if item.size <= budget:
            data = item.path.read_bytes()
            # Changed since it was hashed: the upload's own check reports it.
            if hashlib.sha256(data).hexdigest() == item.sha256:
                budget -= item.size
                inline.append(
                    {"sha256": item.sha256, "data": base64.b64encode(data).decode("ascii")}
                )
                continue
        to_upload.append(item)
    return to_upload


def _report(
    files: list[InputFile],
    sources: list[InputFile],
    to_send: list[InputFile],
    inline: list[dict] | None,
    verbose: bool,
) -> None:
    """What was shipped and what was sent of it, on stderr."""
    sent = {item.sha256 for item in to_send}
    carried = {item["sha256"] for item in inline or []}
    if sources:
        new = [item for item in sources if item.sha256 in sent]
        within = sum(1 for item in new if item.sha256 in carried)
        note(
            f"sources: {len(sources)} module file(s) shipped, {len(new)} uploaded "
            f"({human_bytes(sum(item.size for item in new))})"
            + (f", {within} inline in the submission" if within else "")
        )
        for item in sources if verbose else []:
            note(f"  {item.name} ({human_bytes(item.size)})")
    if files:
        new = [item for item in files if item.sha256 in sent]
        note(
            f"inputs: {len(files)} file(s), {len(new)} uploaded "
            f"({human_bytes(sum(item.size for item in new))}), "
            f"{len(files) - len(new)} already stored"
        )

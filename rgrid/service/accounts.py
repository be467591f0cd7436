"""Accounts and API keys. A key is shown once when issued; only its sha256 is kept."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid.core.errors import AuthError, BadInput, NotFound
from rgrid.core.hashing import sha256_bytes
from rgrid.core.models import Account, ApiKey, utcnow

KEY_PREFIX = "rgk_"


def create_account(session: Session, name: str) -> Account:
    name = name.strip()
    if not name:
        raise BadInput("account name must not be empty")
    if session.scalars(select(Account).where(Account.name == name)).first():
        raise BadInput(f"account {name!r} already exists")
    account = Account(name=name)
    session.add(account)
    session.flush()
    return account


def get_or_create_account(session: Session, name: str) -> Account:
    account = session.scalars(select(Account).where(Account.name == name)).first()
    return account or create_account(session, name)


def find_account(session: Session, name: str) -> Account:
    account = session.scalars(select(Account).where(Account.name == name)).first()
    if account is None:
        raise NotFound(f"no account named {name!r}")
    return account


def issue_key(session: Session, account: Account) -> tuple[ApiKey, str]:
    """Returns the row and the key itself, which is never stored and cannot be shown again."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(account_id=account.id, prefix=secret[:12], key_hash=sha256_bytes(secret.encode()))
    session.add(row)
    session.flush()
    return row, secret


def revoke_key(session: Session, key_id: int) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    if row.revoked_at is not None:
        raise BadInput(f"API key {key_id} was already revoked")
    row.revoked_at = utcnow()
    return row


#: A key's ``last_used_at`` is kept to this many seconds: a request within that of the last
#: recorded use writes nothing, so following a run is not one database write per request.
KEY_USE_RESOLUTION_S = 60


def authenticate(session: Session, secret: str | None) -> int:
    """The id of the account a bearer key belongs to; one message for every way a key can
    be wrong. One indexed read (the key's account is its own column)."""
    if not secret:
        raise AuthError("missing API key: set RGRID_API_KEY")
    row = session.scalars(
        select(ApiKey).where(ApiKey.key_hash == sha256_bytes(secret.encode()))
    ).first()
    if row is None or row.revoked_at is not None:
        raise AuthError("invalid or revoked API key")
    now = utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() >= KEY_USE_RESOLUTION_S:
        row.last_used_at = now
    return row.account_id

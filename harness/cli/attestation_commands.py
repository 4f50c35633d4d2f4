"""Commands of the attestation area (placeholder until that area lands)."""


def register(subparsers) -> None:
    """Add this area's sub-commands to subparsers (none yet)."""

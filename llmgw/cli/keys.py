"""`python -m llmgw keys {hash,new,check}`: make API keys and key file entries, check a key file.

    llmgw keys new                 a fresh key (print it once, hand it out) and its key file entry
    llmgw keys hash < key.txt      the sha256 to put in the key file for a key read from stdin (or the argument)
    llmgw keys check keys.toml     parse a key file as the gateway would: "ok ..." or the error with its line

The key file holds hashes only (docs/tenancy.md). A key given as an argument is visible to other local users in
the process list: prefer stdin. Errors never repeat the key.
"""

from __future__ import annotations

HELP = "API keys for the gateway: new key, hash of a key for the key file, check a key file"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION")
    new = sub.add_parser("new", help="generate a key (256 random bits) and print it with its key file entry")
    new.add_argument("--tenant", default="my-tenant", help="tenant name for the printed entry")
    hashed = sub.add_parser("hash", help="print the sha256 of a key (read from stdin unless given)")
    hashed.add_argument("key", nargs="?", default=None, help="the key (default: read one line from stdin)")
    check = sub.add_parser("check", help="parse a key file; exit 2 with the file and line of the first problem")
    check.add_argument("path", help="the key file (TOML)")


def run(args) -> int:
    import sys

    from llmgw.tenancy.keys import KeyFileError, hash_key, load_key_file, new_key

    command = getattr(args, "keys_command", None)
    if command == "new":
        key = new_key()
        print(f"key: {key}\n\n[[key]]\nsha256 = \"{hash_key(key)}\"\ntenant = \"{args.tenant}\"")
        return 0
    if command == "hash":
        key = args.key
        if key is None:
            line = sys.stdin.readline()
            key = line.rstrip("\r\n")
        try:
            print(hash_key(key))
        except ValueError as exc:
            print(f"keys hash: {exc}", file=sys.stderr)
            return 2
        return 0
    if command == "check":
        try:
            ring = load_key_file(args.path)
        except KeyFileError as exc:
            print(f"keys check: {exc}", file=sys.stderr)
            return 2
        print(f"ok: {len(ring)} keys, {len(ring.tenants)} tenants ({', '.join(sorted(ring.tenants)) or '-'})")
        return 0
    print("usage: llmgw keys {new,hash,check} ...", file=sys.stderr)
    return 2

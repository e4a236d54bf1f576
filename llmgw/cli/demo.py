"""`python -m llmgw demo`: the routing core at work, in a few lines of output (what `make run` shows for now)."""

from __future__ import annotations

HELP = "show routing decisions: affinity, least-connections fallback under load, and a member leaving"

PROMPTS = [
    "Translate to French: the weather is lovely today",
    "Translate to French: where is the train station?",
    "Summarise the following contract between Acme Corp and Globex Industries",
    "Write a haiku about distributed systems",
    "Explain consistent hashing with bounded loads to a new engineer",
    "def fibonacci(n):  # complete this Python function",
    "What is the capital of Australia?",
    "List three prime numbers greater than one hundred",
    "Tell me a joke about gossip protocols",
    "How do I bake sourdough bread at home?",
    "Compose an email declining a meeting politely",
    "Describe the SWIM failure detector in two sentences",
]


def add_arguments(p) -> None:
    p.add_argument("--members", type=int, default=4, help="replicas on the ring (2..26)")
    p.add_argument("--capacity", type=int, default=8, help="max in-flight requests per replica")
    p.add_argument("--seed", type=int, default=7, help="least-connections tie-break seed")


def run(args) -> int:
    import sys

    from llmgw.routing import Router

    if not 2 <= args.members <= 26 or args.capacity < 2:
        print("--members must be in 2..26 and --capacity >= 2", file=sys.stderr)
        return 2
    names = [f"replica-{chr(ord('a') + i)}" for i in range(args.members)]
    router = Router(seed=args.seed)
    for name in names:
        router.set_member(name, capacity=args.capacity)

    def short(prompt: str) -> str:
        return prompt if len(prompt) <= 44 else prompt[:41] + "..."

    print(f"Ring: {len(names)} replicas x {router.vnodes} virtual nodes, capacity {args.capacity} each, "
          f"bounded loads c={router.balance}, affinity key = first {router.prefix_chars} characters\n")

    print("1. Idle cluster: every prompt goes to its ring owner (affinity)")
    owners: dict[str, str] = {}
    for prompt in PROMPTS:
        decision = router.route(prompt)
        if decision.member is None:  # every replica is up and idle here: only a broken router says no
            raise SystemExit(f"demo: no replica for {short(prompt)!r} ({decision.reason})")
        owners[prompt] = decision.member
        print(f"   {short(prompt):<44} -> {decision.member:<10} ({decision.reason})")

    suspect = names[-1]
    busy = names[:-1]
    router.set_member(suspect, capacity=args.capacity, state="suspect")
    for name in busy:
        router.set_load(name, args.capacity // 2)
    print(f"\n2. {suspect} is SUSPECT (missed pings) and the others already run {args.capacity // 2} requests each;"
          f"\n   every routed request stays in flight. Over-bound replicas are skipped on the ring; when every"
          f"\n   ALIVE replica is at the bound, least-connections takes over; the suspect is never chosen")
    for prompt in PROMPTS:
        bound = router.ring.bound()
        decision = router.route(prompt)
        if decision.member is not None:
            router.add_load(decision.member, 1)
        loads = " ".join(f"{n[-1]}={router.load(n)}" for n in names)
        print(f"   {short(prompt):<44} -> {decision.member!s:<10} {decision.reason:<17} "
              f"bound {bound}, loads now {loads}")
    router.set_member(suspect, capacity=args.capacity)
    for name in names:
        router.set_load(name, 0)

    prompt = PROMPTS[2]
    print(f"\n3. Failover order for {short(prompt)!r}: {', '.join(router.preference_list(prompt, 3))}")
    first = router.route(prompt).member
    if first is None:
        raise SystemExit(f"demo: no replica for {short(prompt)!r}")
    print(f"   if {first} fails mid-stream, the retry excludes it -> {router.route(prompt, exclude=[first]).member}")

    leaving = owners[PROMPTS[0]]
    router.remove_member(leaving)
    print(f"\n4. {leaving} leaves the cluster: only the prompts it owned move")
    moved = 0
    for prompt in PROMPTS:
        after = router.route(prompt).member
        if after != owners[prompt]:
            moved += 1
            print(f"   {short(prompt):<44}    {owners[prompt]} -> {after}")
    print(f"   {moved} of {len(PROMPTS)} prompts moved; the other {len(PROMPTS) - moved} kept their replica")
    return 0

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""SWIM membership with Lifeguard: one sans-IO state machine per node.

Three doors in (``handle_datagram``, ``tick``, user calls such as ``set_meta``/``leave``/``user_message``) and
three queues out (``drain_outgoing`` -> [(address, bytes)], ``drain_events`` -> [(kind, member tuple)],
``drain_user_messages`` -> [(sender id, payload)]). The machine never reads a
clock or touches a socket: ``now`` (monotonic seconds) is passed in and ``next_deadline()`` says when ``tick`` is
next due. The UDP shell (llmgw.gossip.node) and the simulator (llmgw.gossip.simulator) drive the same calls.

Because a relay is only another state of this machine (a pending ``_Relay`` record plus a timer), relaying a
PING_REQ never blocks anything: the ACK it waits for arrives through ``handle_datagram`` like any other datagram.

Merge rule (see ``outranks``): a higher incarnation wins; at equal incarnation DEAD == LEFT > SUSPECT > ALIVE.
Metadata is not state: a member's own ALIVE update (one whose sender is that member) at the incarnation we hold
replaces its metadata without changing its state -- reference nodes publish load that way, at an unchanged
incarnation, on every datagram they send.

What the core keeps is what was gossiped: an id, a gossip address, a state and incarnation, and metadata it carries
without interpreting (the advertised service address, the role number, load, capacity, version, weight,
draining, and ``app_meta``: opaque bytes of the application's, memberlist's Node.Meta). What any of it means to the
application is decided by the shell (llmgw.gossip.node, llmgw.topology).

User messages (memberlist's SendBestEffort/NotifyMsg) are one USER datagram to one live member, best effort,
signed like every datagram (the shell sends them only to members that understand them: llmgw.topology). They
carry no updates and change nothing in the member table: the application's traffic must not be able to keep a
member alive (only probes decide that) nor to introduce one.
"""

import heapq
import random as _random
import zlib
from libc.math cimport log10, ceil, floor, isfinite

from llmgw._core.codec cimport (Update, Message, encode_limited, decode,
                                PING, PING_REQ, ACK, NACK, SYNC, SYNC_ACK, USER,
                                ALIVE, SUSPECT, DEAD, LEFT)
from llmgw._core.codec import CodecError
from llmgw._core.awareness cimport Awareness
from llmgw._core.broadcast cimport Broadcast, BroadcastQueue
from llmgw._core.suspicion cimport Suspicion

STATE_NAMES = ("alive", "suspect", "dead", "left")
# Fields of the member tuples returned by members()/drain_events(), in order: as gossiped (grpc_address is what the
# member advertised, "" when nothing; role is the raw number, 0 when unspecified). llmgw.gossip.node builds its
# Member from them by name.
MEMBER_FIELDS = ("member_id", "address", "grpc_address", "role", "state", "incarnation", "model_version",
                 "active_requests", "max_capacity", "weight", "draining", "app_meta")
# Largest opaque application metadata per member (memberlist allows 512). With the member's other fields it still
# fits one 1,400-byte datagram; a larger one from the network is dropped (counted in metadata_clamped).
cdef Py_ssize_t _MAX_APP_META = 1024
MAX_APP_META = _MAX_APP_META
# Received user messages waiting for drain_user_messages(); past this, new ones are dropped (user_dropped), so a
# shell that stops draining cannot make the core grow without bound.
cdef Py_ssize_t _MAX_PENDING_USER_MESSAGES = 4096
MAX_PENDING_USER_MESSAGES = _MAX_PENDING_USER_MESSAGES

# Timer kinds
cdef enum:
    T_PROBE = 0          # start the next probe round
    T_PROBE_TIMEOUT = 1  # direct probe unanswered -> ask k relays
    T_PROBE_END = 2      # probe round over -> suspect the target if still unanswered
    T_RELAY_TIMEOUT = 3  # relay's own ping unanswered -> NACK the requester
    T_SUSPICION = 4      # suspicion may have expired -> DEAD
    T_GOSSIP = 5
    T_PUSH_PULL = 6
    T_JOIN = 7
    T_GC = 8
    T_META = 9           # rate-limited publication of a load-only metadata change
    T_RECONNECT = 10     # try one DEAD member or an unknown seed (heals partitions)

cdef double GC_PERIOD = 1.0
cdef double SYNC_MEMORY = 60.0  # how long a SYNC session id is remembered (answer each session once)
# Sequence numbers start at a random point below this (not at 0): a restarted process must not reuse its previous
# life's numbers, or peers take its join SYNC for an already-answered session and its ACKs for stale ones.
cdef unsigned long long SEQ_START_RANGE = 1ULL << 32
cdef Py_ssize_t MAX_SYNC_SESSIONS = 4096
cdef unsigned long long INCARNATION_CEILING = 1ULL << 63  # never let +1 wrap around
# ALIVE news (a join, a metadata change, a refutation) gets this many times the normal retransmit budget B: an
# epidemic with budget B misses a given node with probability ~exp(-B) (B = 8 at N = 30), and a node that misses
# a refutation declares a live member DEAD, one that misses a metadata change routes on stale data until the next
# anti-entropy round. Tripling B makes that ~e^-24; suspicions and confirmations, by far the most numerous
# rumours under loss, keep the plain budget.
cdef int NEWS_BUDGET_MULT = 3


cpdef int state_rank(int state):
    """Precedence at equal incarnation: ALIVE < SUSPECT < DEAD == LEFT."""
    if state == ALIVE:
        return 0
    if state == SUSPECT:
        return 1
    return 2


cpdef bint outranks(unsigned long long new_inc, int new_state, unsigned long long cur_inc, int cur_state):
    """True when an update (new_inc, new_state) overrides what we hold (cur_inc, cur_state)."""
    if new_inc != cur_inc:
        return new_inc > cur_inc
    return state_rank(new_state) > state_rank(cur_state)


cdef class _Member:
    cdef public str member_id, address, model_version, grpc_address, reporter_id
    cdef public int state, role, active_requests, max_capacity
    cdef public unsigned long long incarnation
    cdef public double weight, state_since
    cdef public bint draining
    cdef public bytes app_meta
    cdef public Suspicion suspicion
    cdef public unsigned int ring_key  # position on the shared probe ring (crc32 of the id: same on every node)

    def __cinit__(self):
        self.app_meta = b""

    cdef Update to_update(self):
        return Update(self.member_id, self.address, self.state, self.incarnation, self.model_version,
                      self.active_requests, self.max_capacity, self.grpc_address, self.role,
                      self.weight, self.draining, self.reporter_id, self.app_meta)

    cdef void take_fields(self, Update u):
        if u.address:
            self.address = u.address
        self.model_version = u.model_version
        self.active_requests = u.active_requests
        self.max_capacity = u.max_capacity
        self.grpc_address = u.grpc_address
        self.role = u.role
        self.weight = u.weight
        self.draining = u.draining
        self.reporter_id = u.reporter_id
        self.app_meta = u.app_meta

    cdef tuple meta_key(self):
        return (self.address, self.model_version, self.active_requests, self.max_capacity, self.grpc_address,
                self.role, self.weight, self.draining, self.app_meta)

    cpdef tuple snapshot(self):
        return (self.member_id, self.address, self.grpc_address, self.role,
                STATE_NAMES[self.state if 0 <= self.state <= 3 else 2],
                self.incarnation, self.model_version, self.active_requests, self.max_capacity,
                self.weight if self.weight > 0 else 1.0, self.draining, self.app_meta)


cdef class _Probe:
    cdef public unsigned long long seq
    cdef public str target_id
    cdef public unsigned long long target_incarnation
    cdef public double start
    cdef public bint acked
    cdef public int expected_nacks, nacks


cdef class _Relay:
    cdef public str requester_address, target_id
    cdef public unsigned long long requester_seq


cdef class Swim:
    """SWIM + Lifeguard membership state machine for one node. See the module docstring."""

    # identity and own state
    cdef readonly str member_id
    cdef readonly str address
    cdef _Member _self
    cdef readonly bint leaving
    cdef unsigned long long _incarnation_floor
    # config
    cdef double period, probe_timeout, suspicion_mult, suspicion_max_mult, gossip_interval, gossip_min_interval
    cdef double push_pull_interval, join_retry_interval, dead_gc_after, tombstone_ttl, reconnect_interval
    cdef int k_indirect, retransmit_mult, gossip_fanout, max_payload
    cdef unsigned long long max_jump, max_self_lead
    cdef Py_ssize_t max_members, max_datagram_in
    cdef double wall_offset
    cdef object auth
    # state
    cdef dict _members            # member_id -> _Member (excluding self)
    cdef dict _tombstones         # member_id -> (incarnation, removed_at)
    cdef int _n_live              # ALIVE + SUSPECT others
    cdef list _live_cache         # list of live member ids (rebuilt lazily)
    cdef bint _live_dirty
    cdef list _ring               # live members and self, ordered by ring_key (same order on every node)
    cdef Py_ssize_t _ring_self
    cdef bint _ring_schedule
    cdef double _phase
    cdef list _probe_order
    cdef Py_ssize_t _probe_index
    cdef dict _probes             # seq -> _Probe
    cdef dict _relays             # our ping seq -> _Relay
    cdef BroadcastQueue _queue
    cdef dict _sync_sessions      # (sender_id, seq) -> time answered
    cdef list _seeds
    cdef bint _synced             # a full state (SYNC or SYNC_ACK) reached us since join()
    cdef list _timers
    cdef long long _timer_seq
    cdef double _last_push_pull, _probe_due, _gossip_due, _last_gossip, _meta_due, _last_meta_publish
    cdef bint _meta_pending
    cdef unsigned long long _seq
    cdef Awareness _awareness
    cdef object _rng
    cdef list _out
    cdef list _events
    cdef list _user_in            # received user messages: (sender_id, payload)
    cdef double _now
    # counters
    cdef public unsigned long long messages_in, messages_out, bytes_in, bytes_out, malformed, auth_rejected
    cdef public unsigned long long replays_rejected, misdirected, implausible, pings_sent, ping_reqs_sent
    cdef public unsigned long long acks_received, indirect_acks, nacks_sent, nacks_received, probes_failed
    cdef public unsigned long long suspicions_raised, refutations, deaths_declared, updates_sent
    cdef public unsigned long long syncs_sent, gossip_sent, relays_served, corrections_sent, sync_bytes_out
    cdef public unsigned long long oversized, members_refused, metadata_clamped, placeholders_ignored
    cdef public unsigned long long owner_meta_applied
    cdef public unsigned long long user_sent, user_received, user_dropped, user_refused
    cdef readonly str placeholder_prefix

    def __init__(self, str member_id not None, str address not None, config, seed=0, double now=0.0,
                 unsigned long long incarnation=0, *, int role=0, str grpc_address not None="",
                 str model_version not None="", int max_capacity=0, int active_requests=0, double weight=1.0,
                 bint draining=False, double wall_offset=0.0, auth=None, str placeholder_prefix not None="",
                 app_meta=b""):
        if not member_id:
            raise ValueError("member_id must not be empty")
        app_meta = _checked_app_meta(app_meta)
        if ":" not in address:
            raise ValueError(f"address must be host:port, got {address!r}")
        self.member_id = member_id
        self.address = address
        self.period = config.protocol_period
        self.probe_timeout = config.probe_timeout
        self.k_indirect = config.indirect_probes
        self.suspicion_mult = config.suspicion_mult
        self.suspicion_max_mult = config.suspicion_max_mult
        self._awareness = Awareness(config.awareness_max)
        self.retransmit_mult = config.retransmit_mult
        self.gossip_interval = config.gossip_interval
        self.gossip_min_interval = config.gossip_min_interval
        self.gossip_fanout = config.gossip_fanout
        self.push_pull_interval = config.push_pull_interval
        self.join_retry_interval = config.join_retry_interval
        self.reconnect_interval = config.reconnect_interval
        self.dead_gc_after = config.dead_gc_after
        self.tombstone_ttl = config.tombstone_ttl
        self.max_jump = config.max_incarnation_jump
        self.max_self_lead = getattr(config, "max_self_incarnation_lead", 600_000)
        self.max_members = getattr(config, "max_members", 10_000)
        self.auth = auth
        # Some peers list a seed they have not heard from yet as a member named <prefix><its address> and gossip it
        # on; such an update names an address, not a member (see _is_placeholder). "" = no such convention.
        self.placeholder_prefix = placeholder_prefix
        self.max_payload = config.max_datagram - (auth.overhead if auth is not None else 0)
        # What a peer with our settings can send: max_payload plus its tag. Anything longer is not from one.
        self.max_datagram_in = config.max_datagram + (auth.overhead if auth is not None else 0)
        self.wall_offset = wall_offset
        if incarnation >= INCARNATION_CEILING:
            raise ValueError("incarnation must be < 2**63")
        self._incarnation_floor = incarnation
        self._rng = _random.Random(seed)
        self._now = now

        me = _Member()
        me.member_id = member_id
        me.address = address
        me.state = ALIVE
        me.incarnation = incarnation
        me.model_version = model_version
        me.active_requests = active_requests
        me.max_capacity = max_capacity
        me.grpc_address = grpc_address
        me.role = role
        me.weight = weight
        me.draining = draining
        me.app_meta = app_meta
        me.reporter_id = ""
        me.state_since = now
        me.ring_key = _ring_key(member_id)
        self._self = me
        self._ring_schedule = getattr(config, "probe_schedule", "ring") == "ring"
        self._phase = me.ring_key / 4294967296.0

        self._members = {}
        self._tombstones = {}
        self._live_cache = []
        self._live_dirty = True
        self._probe_order = []
        self._probe_index = 0
        self._probes = {}
        self._relays = {}
        self._queue = BroadcastQueue()
        self._sync_sessions = {}
        self._seeds = []
        self._timers = []
        self._out = []
        self._events = []
        self._user_in = []
        # Own generator (not self._rng): drawing here would shift every later draw of a seeded core.
        self._seq = _random.Random(f"seq:{seed!r}").getrandbits(32) % SEQ_START_RANGE
        self._last_gossip = -1e18
        self._last_meta_publish = -1e18
        self._meta_due = 1e300
        self._gossip_due = 1e300
        if self._ring_schedule:
            self._probe_due = self._step_time(self._step_at(now) + 1)
        else:
            # Spread the first probe over one period so nodes started together do not probe in lockstep.
            self._probe_due = now + self._rng.random() * self.period
        self._push(self._probe_due, T_PROBE, None, 0)
        # Random phase: as if the previous exchange happened somewhere within the last interval.
        self._last_push_pull = now - self._rng.random() * self.push_pull_interval
        self._push(self._last_push_pull + self.push_pull_interval, T_PUSH_PULL, None, 0)
        self._push(now + GC_PERIOD, T_GC, None, 0)
        self._push(now + self.reconnect_interval * (0.5 + self._rng.random()), T_RECONNECT, None, 0)
        if app_meta:
            self._check_fits_datagram(me.to_update())
        # Our own ALIVE is news for whoever we talk to first.
        self._enqueue(me.to_update(), now)

    # ------------------------------------------------------------------------------------------------------------
    # public surface

    @property
    def incarnation(self):
        return self._self.incarnation

    def local_member(self):
        return self._self.snapshot()

    def members(self, bint include_self=False):
        """Snapshot tuples (fields: MEMBER_FIELDS) of every known member, DEAD/LEFT ones until garbage-collected."""
        cdef list out = [m.snapshot() for m in self._members.values()]
        if include_self:
            out.append(self._self.snapshot())
        return out

    def member(self, str member_id):
        if member_id == self.member_id:
            return self._self.snapshot()
        m = self._members.get(member_id)
        return None if m is None else (<_Member>m).snapshot()

    def num_live(self):
        """Live (ALIVE or SUSPECT) members, self included."""
        return self._n_live + 1

    @property
    def awareness(self):
        """Lifeguard local health score (0 = healthy)."""
        return self._awareness.score

    def pending_broadcasts(self):
        return len(self._queue)

    def retransmit_limit(self):
        return self._retransmit_limit()

    def suspicion_of(self, str member_id):
        """(confirmations, timeout, deadline) of the running suspicion of member_id, or None."""
        m = self._members.get(member_id)
        if m is None or (<_Member>m).suspicion is None:
            return None
        s = (<_Member>m).suspicion
        return (s.confirmations(), s.timeout(), s.deadline)

    @property
    def stats(self):
        return {
            "messages_in": self.messages_in, "messages_out": self.messages_out, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "malformed": self.malformed, "auth_rejected": self.auth_rejected,
            "replays_rejected": self.replays_rejected, "misdirected": self.misdirected,
            "implausible": self.implausible, "pings_sent": self.pings_sent, "ping_reqs_sent": self.ping_reqs_sent,
            "acks_received": self.acks_received, "indirect_acks": self.indirect_acks, "nacks_sent": self.nacks_sent,
            "nacks_received": self.nacks_received, "probes_failed": self.probes_failed,
            "suspicions_raised": self.suspicions_raised, "refutations": self.refutations,
            "deaths_declared": self.deaths_declared, "updates_sent": self.updates_sent,
            "syncs_sent": self.syncs_sent, "gossip_sent": self.gossip_sent, "relays_served": self.relays_served, "sync_bytes_out": self.sync_bytes_out,
            "corrections_sent": self.corrections_sent, "oversized": self.oversized,
            "members_refused": self.members_refused, "metadata_clamped": self.metadata_clamped,
            "placeholders_ignored": self.placeholders_ignored, "owner_meta_applied": self.owner_meta_applied,
            "user_sent": self.user_sent, "user_received": self.user_received, "user_dropped": self.user_dropped,
            "user_refused": self.user_refused,
            "awareness": self._awareness.score, "members_live": self._n_live + 1, "incarnation": self._self.incarnation,
        }

    def drain_outgoing(self):
        """Datagrams to send: list of (address, bytes). Each is at most config.max_datagram bytes."""
        out = self._out
        self._out = []
        return out

    def drain_events(self):
        """Membership events since the last drain: list of (kind, member tuple)."""
        ev = self._events
        self._events = []
        return ev

    def drain_user_messages(self):
        """User messages received since the last drain: list of (sender_id, payload bytes), in arrival order."""
        got = self._user_in
        self._user_in = []
        return got

    def max_user_payload(self, str target_id not None):
        """The largest payload user_message() accepts for target_id: what fits one datagram after the header
        (counted with the longest sequence number and timestamp, so the figure never changes over time)."""
        cdef Message msg = Message.__new__(Message)
        cdef Py_ssize_t room, n
        msg.type = USER
        msg.set_sender_id(self.member_id)
        msg.set_target_id(target_id)
        msg.sequence_num = 0xFFFFFFFFFFFFFFFF
        msg.set_sender_address(self.address)
        msg.timestamp_ms = 0xFFFFFFFFFFFFFFFF
        try:
            header, _ = encode_limited(msg, [], self.max_payload)
        except CodecError:
            return 0
        room = self.max_payload - len(header) - 1  # the payload's tag
        n = room - 1
        while n > 0 and _varint_len(n) + n > room:
            n -= 1
        return n if n > 0 else 0

    def user_message(self, str target_id not None, payload, double now):
        """Queue one USER datagram carrying `payload` (bytes-like) to member target_id, best effort.

        Returns False, sending nothing (counted in user_refused), when the target is not a live (ALIVE or SUSPECT)
        member, the payload is larger than max_user_payload(target_id), or we are leaving. Whether the target
        understands USER at all (reference peers do not) is the shell's to decide (llmgw.topology)."""
        cdef bytes data = payload if type(payload) is bytes else bytes(memoryview(payload))
        cdef Message msg
        cdef _Member m = self._members.get(target_id)
        self._now = now
        if (self.leaving or m is None or not (m.state == ALIVE or m.state == SUSPECT)
                or len(data) > self.max_user_payload(target_id)):
            self.user_refused += 1
            return False
        msg = Message.__new__(Message)
        msg.type = USER
        msg.set_sender_id(self.member_id)
        msg.set_target_id(target_id)
        # A fresh sequence number makes every datagram unique: with a key, two equal payloads sent within the same
        # millisecond would otherwise carry the same tag and the second would be refused as a replay.
        self._seq += 1
        msg.sequence_num = self._seq
        msg.set_sender_address(self.address)
        msg.timestamp_ms = self._wall_ms(now)
        msg.payload = data
        encoded, _ = encode_limited(msg, [], self.max_payload)
        self.user_sent += 1
        self._emit_datagram(m.address, encoded)
        return True

    cpdef double next_deadline(self):
        """Monotonic time at which tick() next has work (may be early: stale timers are skipped cheaply)."""
        if self._timers:
            return self._timers[0][0]
        return 1e300

    def join(self, seeds, double now):
        """Contact seeds ("host:port") with a full-state SYNC now, and again every join_retry_interval until a full
        state has come back (or, later, whenever no other live member is known)."""
        self._now = now
        self._synced = False
        self._seeds = [s for s in seeds if s and s != self.address]
        for s in self._seeds:
            if ":" not in s:
                raise ValueError(f"seed must be host:port, got {s!r}")
        self._join_round(now)

    def leave(self, double now):
        """Announce LEFT (graceful leave) to several members now; afterwards the node stays silent."""
        cdef list targets
        self._now = now
        if self.leaving:
            return
        self.leaving = True
        me = self._self
        me.incarnation = min(me.incarnation + 1, INCARNATION_CEILING)
        me.state = LEFT
        me.state_since = now
        self._queue.clear()
        u = me.to_update()
        u.reporter_id = self.member_id
        targets = self._random_live(max(self.gossip_fanout, self.k_indirect) * 2, None)
        for mid in targets:
            m = <_Member>self._members[mid]
            self._send(ACK, m.address, mid, 0, "", [u], False)

    def set_meta(self, double now, active_requests=None, max_capacity=None, model_version=None, weight=None,
                 draining=None, grpc_address=None, app_meta=None):
        """Change our metadata. Load-only changes are published at most once per protocol period."""
        me = self._self
        self._now = now
        cdef bint other_changed = False
        cdef bint load_changed = False
        cdef Update candidate
        if app_meta is not None:
            app_meta = _checked_app_meta(app_meta)
        if app_meta:
            candidate = me.to_update()
            candidate.app_meta = app_meta
            if model_version is not None:
                candidate.model_version = str(model_version)
            if grpc_address is not None:
                candidate.grpc_address = str(grpc_address)
            self._check_fits_datagram(candidate)
        if active_requests is not None and int(active_requests) < 0:
            raise ValueError(f"active_requests must be >= 0, got {active_requests!r}")
        if max_capacity is not None and int(max_capacity) < 0:
            raise ValueError(f"max_capacity must be >= 0, got {max_capacity!r}")
        if weight is not None and not (isfinite(float(weight)) and float(weight) >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if active_requests is not None and int(active_requests) != me.active_requests:
            me.active_requests = int(active_requests)
            load_changed = True
        if max_capacity is not None and int(max_capacity) != me.max_capacity:
            me.max_capacity = int(max_capacity)
            other_changed = True
        if model_version is not None and str(model_version) != me.model_version:
            me.model_version = str(model_version)
            other_changed = True
        if weight is not None and float(weight) != me.weight:
            me.weight = float(weight)
            other_changed = True
        if draining is not None and bool(draining) != me.draining:
            me.draining = bool(draining)
            other_changed = True
        if grpc_address is not None and str(grpc_address) != me.grpc_address:
            me.grpc_address = str(grpc_address)
            other_changed = True
        if app_meta is not None and app_meta != me.app_meta:
            me.app_meta = app_meta
            other_changed = True
        if self.leaving:
            return
        if other_changed or (load_changed and now >= self._last_meta_publish + self.period):
            self._publish_self(now)
        elif load_changed and not self._meta_pending:
            self._meta_pending = True
            self._meta_due = self._last_meta_publish + self.period
            self._push(self._meta_due, T_META, None, 0)

    def handle_datagram(self, data, str source_address not None, double now):
        """Process one received datagram. Malformed, unauthenticated or replayed datagrams are counted and dropped."""
        cdef Message msg
        cdef bytes payload
        self._now = now
        self.messages_in += 1
        self.bytes_in += len(data)
        if len(data) > self.max_datagram_in:
            # No member sends this much; decoding it would apply thousands of spoofed updates at once.
            self.oversized += 1
            return
        if self.auth is not None:
            opened = self.auth.open(data)
            if opened is None:
                self.auth_rejected += 1
                return
            payload, tag = opened
        else:
            payload = bytes(data)
        try:
            msg = decode(payload)
        except (CodecError, ValueError, TypeError):
            self.malformed += 1
            return
        if self.auth is not None and not self.auth.accept_fresh(tag, msg.timestamp_ms, self._wall_ms(now)):
            self.replays_rejected += 1
            return
        if msg.get_sender_id() == self.member_id or not msg.get_sender_id():
            self.misdirected += 1
            return
        if self.leaving:
            return
        self._dispatch(msg, source_address, now)

    def tick(self, double now):
        """Fire every timer due at or before now."""
        cdef tuple entry
        self._now = now
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if self.leaving:
                continue
            self._fire(entry[2], entry[3], entry[4], entry[0], now)

    # ------------------------------------------------------------------------------------------------------------
    # timers

    cdef void _push(self, double when, int kind, object key, unsigned long long token):
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, kind, key, token))

    cdef _fire(self, int kind, object key, unsigned long long token, double when, double now):
        cdef _Probe p
        cdef _Relay r
        cdef _Member m
        if kind == T_PROBE:
            if when == self._probe_due:
                self._probe_round(now)
        elif kind == T_PROBE_TIMEOUT:
            p = self._probes.get(token)
            if p is not None and not p.acked:
                self._indirect_probe(p, now)
        elif kind == T_PROBE_END:
            p = self._probes.pop(token, None)
            if p is not None:
                self._finish_probe(p, now)
        elif kind == T_RELAY_TIMEOUT:
            r = self._relays.pop(token, None)
            if r is not None:
                self.nacks_sent += 1
                self._send(NACK, r.requester_address, "", r.requester_seq, "", None, False)
        elif kind == T_SUSPICION:
            m = self._members.get(key)
            if (m is not None and m.state == SUSPECT and m.suspicion is not None
                    and m.suspicion.incarnation == token and m.suspicion.deadline <= now + 1e-9):
                self._declare_dead(m, now)
        elif kind == T_GOSSIP:
            if when == self._gossip_due:
                self._gossip_round(now)
        elif kind == T_PUSH_PULL:
            self._push_pull_round(now)
        elif kind == T_JOIN:
            self._join_round(now)
        elif kind == T_GC:
            self._gc(now)
            self._push(now + GC_PERIOD, T_GC, None, 0)
        elif kind == T_META:
            if self._meta_pending and when == self._meta_due:
                self._publish_self(now)
        elif kind == T_RECONNECT:
            self._reconnect_round(now)
            self._push(now + self.reconnect_interval * (0.75 + 0.5 * self._rng.random()), T_RECONNECT, None, 0)

    # ------------------------------------------------------------------------------------------------------------
    # probing (SWIM failure detector + Lifeguard awareness)

    cdef inline double _scale(self):
        return self._awareness.scale()

    cdef inline void _adjust_awareness(self, int delta):
        self._awareness.apply(delta)

    cdef _next_probe_target(self):
        """Shuffled round-robin over live members: every live member is probed once per pass."""
        cdef _Member m
        cdef int tries = 0
        while tries < 2:
            while self._probe_index < len(self._probe_order):
                mid = self._probe_order[self._probe_index]
                self._probe_index += 1
                m = self._members.get(mid)
                if m is not None and (m.state == ALIVE or m.state == SUSPECT):
                    return m
            self._probe_order = list(self._live_ids())
            self._rng.shuffle(self._probe_order)
            self._probe_index = 0
            tries += 1
        return None

    cdef long long _step_at(self, double now):
        return <long long>floor((now + self.wall_offset) / self.period - self._phase + 1e-6)

    cdef double _step_time(self, long long step):
        return (step + self._phase) * self.period - self.wall_offset

    cdef _ring_target(self, long long step):
        """Ring schedule: at step s every node probes the member (1 + s mod (L - 1)) places after itself on a ring
        ordered the same way everywhere, so each member is probed by exactly one node per period (when views
        agree) and every member is visited once per L - 1 periods."""
        cdef list ring
        cdef Py_ssize_t L, d
        self._live_ids()
        ring = self._ring
        L = len(ring)
        if L < 2:
            return None
        d = 1 + <Py_ssize_t>(step % (L - 1))
        return self._members.get(ring[(self._ring_self + d) % L])

    cdef _probe_round(self, double now):
        cdef double interval = self.period * self._scale()
        cdef _Member target
        cdef _Probe p
        cdef long long step = 0
        cdef bint ring = self._ring_schedule and self._awareness.score == 0
        if ring:
            step = self._step_at(now)
            target = self._ring_target(step)
        else:
            # Degraded (awareness > 0) nodes fall back to their own shuffled round-robin: skipping steps on the
            # ring could leave some members unvisited.
            target = self._next_probe_target()
        if target is not None:
            self._seq += 1
            p = _Probe()
            p.seq = self._seq
            p.target_id = target.member_id
            p.target_incarnation = target.incarnation
            p.start = now
            self._probes[p.seq] = p
            # END before the next round's T_PROBE at the same instant (heap ties break by push order).
            self._push(now + interval, T_PROBE_END, None, p.seq)
            self._push(now + self.probe_timeout * self._scale(), T_PROBE_TIMEOUT, None, p.seq)
            self.pings_sent += 1
            self._send(PING, target.address, target.member_id, p.seq, "", self._buddy(target), True)
        if self._ring_schedule:
            self._probe_due = self._step_time(self._step_at(now) + 1 + self._awareness.score)
        else:
            self._probe_due = now + interval
        self._push(self._probe_due, T_PROBE, None, 0)

    cdef list _buddy(self, _Member target):
        """Buddy system: a PING to a suspect carries its suspicion first, so it can refute at once."""
        if target.state != SUSPECT:
            return None
        u = target.to_update()
        if not u.reporter_id:
            u.reporter_id = self.member_id
        return [u]

    cdef _indirect_probe(self, _Probe p, double now):
        cdef _Member target = self._members.get(p.target_id)
        cdef _Member relay
        if target is None:
            return
        # A second direct PING with the same sequence rides along (memberlist's TCP fallback, over UDP): under
        # i.i.d. loss it cuts false suspicions about tenfold for one extra datagram per failed probe.
        self.pings_sent += 1
        self._send(PING, target.address, target.member_id, p.seq, "", self._buddy(target), True)
        relays = self._random_live(self.k_indirect, p.target_id)
        for rid in relays:
            relay = self._members[rid]
            self.ping_reqs_sent += 1
            self._send(PING_REQ, relay.address, target.member_id, p.seq, target.address, None, True)
        p.expected_nacks = len(relays)

    cdef _finish_probe(self, _Probe p, double now):
        cdef _Member m
        if p.acked:
            self._adjust_awareness(-1)
            return
        self.probes_failed += 1
        # Lifeguard: if the relays did not even NACK, the fault is more likely ours than the target's.
        if p.expected_nacks > 0:
            if p.nacks < p.expected_nacks:
                self._adjust_awareness(p.expected_nacks - p.nacks)
        else:
            self._adjust_awareness(1)
        m = self._members.get(p.target_id)
        if m is None or m.incarnation != p.target_incarnation:
            return  # it refuted or changed in the meantime: that is proof of life
        if m.state == ALIVE or m.state == SUSPECT:
            u = m.to_update()
            u.state = SUSPECT
            u.reporter_id = self.member_id
            self.suspicions_raised += 1
            self._apply(u, now, True, "")

    cdef _handle_ack(self, Message msg, double now):
        cdef _Probe p = self._probes.get(msg.sequence_num)
        cdef _Relay r
        if p is not None:
            if not p.acked:
                p.acked = True
                self.acks_received += 1
                if msg.get_sender_id() != p.target_id:
                    self.indirect_acks += 1
            return
        r = self._relays.pop(msg.sequence_num, None)
        if r is not None and msg.get_sender_id() == r.target_id:
            self._send(ACK, r.requester_address, r.target_id, r.requester_seq, "", None, True)

    cdef _handle_user(self, Message msg, _Member sender):
        """Deliver a USER datagram's payload if it is for us and from a live member; no other effect: updates it
        might carry are ignored, an unknown sender is not learned, a DEAD one is not revived."""
        if msg.get_target_id() != self.member_id:
            self.misdirected += 1
            return
        if (sender is None or not (sender.state == ALIVE or sender.state == SUSPECT)
                or len(self._user_in) >= _MAX_PENDING_USER_MESSAGES):
            self.user_dropped += 1
            return
        self.user_received += 1
        self._user_in.append((sender.member_id, msg.payload))

    cdef _handle_ping_req(self, Message msg, str reply_address, double now):
        cdef _Relay r
        cdef _Member target = self._members.get(msg.get_target_id())
        target_address = msg.get_target_address() or (target.address if target is not None else "")
        if not target_address or msg.get_target_id() == self.member_id:
            if msg.get_target_id() == self.member_id:  # asked to probe ourselves: we are obviously alive
                self._send(ACK, reply_address, self.member_id, msg.sequence_num, "", None, True)
            return
        self.relays_served += 1
        self._seq += 1
        r = _Relay()
        r.requester_address = reply_address
        r.requester_seq = msg.sequence_num
        r.target_id = msg.get_target_id()
        self._relays[self._seq] = r
        self._push(now + self.probe_timeout * self._scale(), T_RELAY_TIMEOUT, None, self._seq)
        self._send(PING, target_address, r.target_id, self._seq, "", self._buddy(target) if target else None,
                   True)

    # ------------------------------------------------------------------------------------------------------------
    # suspicion and death

    cdef double _min_suspicion_timeout(self):
        cdef double n = self._n_live + 1
        cdef double scale = log10(n) if n > 1 else 0.0
        if scale < 1.0:
            scale = 1.0
        return self.suspicion_mult * scale * self.period

    cdef _start_suspicion(self, _Member m, str reporter, double now):
        cdef double lo = self._min_suspicion_timeout()
        # memberlist: expect suspicion_mult - 2 confirmations, none when there are too few other members to give them.
        cdef int k = <int>self.suspicion_mult - 2
        if self._n_live - 1 < k:
            k = 0
        m.suspicion = Suspicion(m.incarnation, now, lo, lo * self.suspicion_max_mult, k, reporter or "?")
        self._push(m.suspicion.deadline, T_SUSPICION, m.member_id, m.incarnation)

    cdef _declare_dead(self, _Member m, double now):
        u = m.to_update()
        u.state = DEAD
        u.reporter_id = self.member_id
        self.deaths_declared += 1
        self._apply(u, now, True, "")

    # ------------------------------------------------------------------------------------------------------------
    # merging updates

    cdef bint _plausible(self, unsigned long long inc, unsigned long long known):
        cdef unsigned long long base = known if known > self._incarnation_floor else self._incarnation_floor
        if base >= INCARNATION_CEILING - self.max_jump:
            return inc < INCARNATION_CEILING
        return inc <= base + self.max_jump

    cdef int _apply(self, Update u, double now, bint rebroadcast, str sender_id) except -1:
        """Merge one rumoured update into the table, recording events and rebroadcasting news. `sender_id` is
        set when `u` is the sender's own word about itself (its last update about itself in the datagram).

        Returns 1 when the rumour is a stale SUSPECT/DEAD of a member we know ALIVE at a higher incarnation (the
        sender missed a refutation and should be told), else 0.
        """
        cdef _Member m
        cdef int old_state
        cdef tuple old_meta
        if not u.member_id or u.state < 0 or u.state > LEFT:
            self.malformed += 1
            return 0
        if u.member_id == self.member_id:
            return self._about_me(u, now)
        if self._is_placeholder(u):
            self.placeholders_ignored += 1
            return 0
        m = self._members.get(u.member_id)
        if not self._plausible(u.incarnation, m.incarnation if m is not None else 0):
            self.implausible += 1
            return 0
        self._sanitize(u)
        if m is None:
            tomb = self._tombstones.get(u.member_id)
            if tomb is not None and u.incarnation <= tomb[0]:
                return 0
            if u.state == DEAD or u.state == LEFT:
                # Remember the death without listing a member we never saw alive -- within the same cap as the
                # table, or rumours about invented ids would grow the tombstones instead.
                if tomb is not None or len(self._tombstones) < self.max_members:
                    self._tombstones[u.member_id] = (u.incarnation, now)
                else:
                    self.members_refused += 1
                return 0
            if not u.address:
                return 0
            if len(self._members) >= self.max_members:
                # Full: a newcomer waits (it is learned once GC frees room); known members are never evicted
                # for it, so a flood of invented ids cannot push real ones out.
                self.members_refused += 1
                return 0
            self._tombstones.pop(u.member_id, None)
            m = _Member()
            m.member_id = u.member_id
            m.ring_key = _ring_key(u.member_id)
            m.take_fields(u)
            m.state = u.state
            m.incarnation = u.incarnation
            m.state_since = now
            self._members[m.member_id] = m
            self._live_changed(1)
            self._insert_probe_target(m.member_id)
            self._emit("joined", m)
            if u.state == SUSPECT:
                self._start_suspicion(m, u.reporter_id, now)
                self._emit("suspect", m)
            if rebroadcast:
                self._enqueue(u, now, NEWS_BUDGET_MULT if u.state == ALIVE else 1)
            return 0
        if not outranks(u.incarnation, u.state, m.incarnation, m.state):
            if (u.member_id == sender_id and u.state == ALIVE and u.incarnation == m.incarnation
                    and (m.state == ALIVE or m.state == SUSPECT)):
                self._take_owner_meta(m, u)
            # Same suspicion from another reporter: Lifeguard counts it as an independent confirmation.
            if (u.state == SUSPECT and m.state == SUSPECT and u.incarnation == m.incarnation
                    and m.suspicion is not None and m.suspicion.confirm(u.reporter_id)):
                self._push(m.suspicion.deadline, T_SUSPICION, m.member_id, m.incarnation)
                if rebroadcast:
                    self._enqueue(u, now)
            return 1 if (m.state == ALIVE and u.state != ALIVE and u.incarnation < m.incarnation) else 0
        old_state = m.state
        old_meta = m.meta_key()
        m.take_fields(u)
        m.incarnation = u.incarnation
        if u.state != old_state:
            m.state_since = now
        m.state = u.state
        if u.state == ALIVE:
            m.suspicion = None
            if old_state == SUSPECT:
                self._emit("alive", m)
            elif old_state == DEAD or old_state == LEFT:
                self._live_changed(1)
                self._insert_probe_target(m.member_id)
                self._emit("joined", m)
            elif m.meta_key() != old_meta:
                self._emit("updated", m)
        elif u.state == SUSPECT:
            if old_state == DEAD or old_state == LEFT:
                self._live_changed(1)
                self._insert_probe_target(m.member_id)
            self._start_suspicion(m, u.reporter_id, now)
            self._emit("suspect", m)
        else:
            m.suspicion = None
            if old_state == ALIVE or old_state == SUSPECT:
                self._live_changed(-1)
            if u.state != old_state:
                self._emit("dead" if u.state == DEAD else "left", m)
        if rebroadcast:
            self._enqueue(u, now, NEWS_BUDGET_MULT if u.state == ALIVE else 1)
        return 0

    cdef bint _is_placeholder(self, Update u):
        """Whether `u` is a peer's stand-in for a seed it has not identified yet: id = prefix + the address (or,
        without an address, prefix + something host:port-like). The real member behind that address is learned
        under its own id; listing the stand-in too would make one node two members."""
        cdef str prefix = self.placeholder_prefix
        cdef str rest
        if not prefix or not u.member_id.startswith(prefix):
            return False
        rest = u.member_id[len(prefix):]
        return rest == u.address if u.address else ":" in rest

    cdef bint _names_our_address(self, str target_id):
        """A PING to the placeholder a peer keeps for our address (it seeded with it) is for us: answering it is
        how that peer keeps the seed alive in its table."""
        return bool(self.placeholder_prefix) and target_id == self.placeholder_prefix + self.address

    cdef void _take_owner_meta(self, _Member m, Update u):
        """The member's own word on its metadata at the incarnation we hold: load, capacity and version change
        without a new incarnation on reference nodes. Not rebroadcast: others hear it from the member itself,
        and would ignore it from us (it is not news by the merge rule)."""
        cdef tuple old_meta = m.meta_key()
        m.take_fields(u)  # u was sanitized by _apply

        if m.meta_key() != old_meta:
            self.owner_meta_applied += 1
            self._emit("updated", m)

    cdef void _sanitize(self, Update u):
        """Clamp metadata no honest member sends (set_meta refuses it): a weight that is not a finite number >= 0
        becomes 0 ("unset", read as the default 1.0), a negative capacity becomes 0 ("unknown") and a negative
        load 0. The rumour's state and incarnation still count; only the insane fields are replaced, and so is
        what we rebroadcast."""
        cdef bint clamped = False
        if not isfinite(u.weight) or u.weight < 0:
            u.weight = 0.0
            clamped = True
        if u.max_capacity < 0:
            u.max_capacity = 0
            clamped = True
        if u.active_requests < 0:
            u.active_requests = 0
            clamped = True
        if len(u.app_meta) > _MAX_APP_META:
            u.app_meta = b""
            clamped = True
        if clamped:
            self.metadata_clamped += 1

    cdef unsigned long long _self_incarnation_bound(self, double now):
        """Highest incarnation a rumour about ourselves may plausibly carry.

        Only a node raises its own incarnation, so a rumour above ours comes from a previous life of ours (or is
        forged). A previous life started at an earlier wall-clock ms (time-based incarnations) and added one per
        refutation or metadata change, so it stays below max(our start incarnation, wall-clock ms now) plus a
        lead (max_self_incarnation_lead, default 10 minutes of ms: clock steps between lives, bumps of the old
        life). Above that the rumour is dropped, so forged rumours can only walk us up one step per datagram,
        not by up to max_incarnation_jump each.
        """
        cdef unsigned long long base = self._incarnation_floor
        cdef unsigned long long wall = self._wall_ms(now)
        if wall > base:
            base = wall
        if base >= INCARNATION_CEILING - self.max_self_lead:
            return INCARNATION_CEILING - 1
        return base + self.max_self_lead

    cdef int _about_me(self, Update u, double now) except -1:
        me = self._self
        if not self._plausible(u.incarnation, me.incarnation) or (
                u.incarnation > me.incarnation and u.incarnation > self._self_incarnation_bound(now)):
            self.implausible += 1
            return 0
        if u.incarnation < me.incarnation:
            return 1 if u.state != ALIVE else 0  # a stale accusation: tell its sender we moved on
        if u.state == ALIVE:
            if u.incarnation > me.incarnation:
                # A rumour from a previous life of ours outranks us: move past it.
                me.incarnation = min(u.incarnation + 1, INCARNATION_CEILING)
                self._enqueue(me.to_update(), now, NEWS_BUDGET_MULT)
            return 0
        # SUSPECT, DEAD or LEFT about us while we are running: refute.
        me.incarnation = min(u.incarnation + 1, INCARNATION_CEILING)
        self.refutations += 1
        self._adjust_awareness(1)
        self._enqueue(me.to_update(), now, NEWS_BUDGET_MULT)
        return 0

    cdef _publish_self(self, double now):
        me = self._self
        me.incarnation = min(me.incarnation + 1, INCARNATION_CEILING)
        self._last_meta_publish = now
        self._meta_pending = False
        self._meta_due = 1e300
        self._enqueue(me.to_update(), now, NEWS_BUDGET_MULT)

    cdef void _emit(self, str kind, _Member m):
        self._events.append((kind, m.snapshot()))

    # ------------------------------------------------------------------------------------------------------------
    # live member bookkeeping

    cdef void _live_changed(self, int delta):
        self._n_live += delta
        self._live_dirty = True

    cdef list _live_ids(self):
        cdef _Member m
        cdef list keyed
        if self._live_dirty:
            self._live_cache = [mid for mid, m in self._members.items() if m.state == ALIVE or m.state == SUSPECT]
            self._live_dirty = False
            if self._ring_schedule:
                keyed = [((<_Member>self._members[mid]).ring_key, mid) for mid in self._live_cache]
                keyed.append((self._self.ring_key, self.member_id))
                keyed.sort()
                self._ring = [k[1] for k in keyed]
                self._ring_self = self._ring.index(self.member_id)
        return self._live_cache

    cdef int _insert_probe_target(self, str member_id) except -1:
        # memberlist: a new member goes to a random position of the current pass, after the cursor.
        cdef Py_ssize_t n = len(self._probe_order)
        cdef double r = self._rng.random()
        cdef Py_ssize_t pos = self._probe_index + <Py_ssize_t>(r * (n - self._probe_index + 1))
        self._probe_order.insert(pos, member_id)
        return 0

    cdef list _random_live(self, int count, object exclude):
        cdef list ids = self._live_ids()
        cdef list picked = []
        cdef int attempts = 0
        cdef Py_ssize_t n = len(ids)
        cdef double r
        if count <= 0 or n == 0:
            return picked
        if n <= count + 1:
            return [mid for mid in ids if mid != exclude][:count]
        while len(picked) < count and attempts < count * 4:
            attempts += 1
            r = self._rng.random()
            mid = ids[<Py_ssize_t>(r * n)]
            if mid != exclude and mid not in picked:
                picked.append(mid)
        return picked

    # ------------------------------------------------------------------------------------------------------------
    # dissemination

    cdef int _retransmit_limit(self):
        return self.retransmit_mult * <int>ceil(log10(self._n_live + 2.0))

    cdef _enqueue(self, Update u, double now, int budget_mult=1):
        cdef double due
        self._queue.push(u, budget_mult)
        due = self._last_gossip + self.gossip_min_interval
        if due < now:
            due = now
        if due < self._gossip_due:
            self._gossip_due = due
            self._push(due, T_GOSSIP, None, 0)

    cdef _send(self, int mtype, str address, str target_id, unsigned long long seq, str target_address,
               list first, bint piggyback):
        cdef Message msg = Message.__new__(Message)
        cdef list queue = None
        cdef list updates
        cdef Py_ssize_t n_first = 0
        cdef Py_ssize_t n
        cdef Broadcast b
        msg.type = mtype
        msg.set_sender_id(self.member_id)
        msg.set_target_id(target_id)
        msg.sequence_num = seq
        msg.set_sender_address(self.address)
        msg.set_target_address(target_address)
        msg.timestamp_ms = self._wall_ms(self._now)
        if first:
            updates = list(first)
            n_first = len(first)
        else:
            updates = []
        if piggyback and self._queue:
            queue = self._queue.ordered()
            updates.extend([b.update for b in queue])
        data, n = encode_limited(msg, updates, self.max_payload)
        if queue is not None and n > n_first:
            self._queue.mark_sent(queue, n - n_first, self._retransmit_limit())
        self.updates_sent += n
        self._emit_datagram(address, data)

    cdef void _emit_datagram(self, str address, bytes data):
        if self.auth is not None:
            data = self.auth.seal(data)
        self.messages_out += 1
        self.bytes_out += len(data)
        self._out.append((address, data))

    cdef _gossip_round(self, double now):
        cdef _Member m
        self._gossip_due = 1e300
        if not self._queue:
            return
        self._last_gossip = now
        for mid in self._random_live(self.gossip_fanout, None):
            m = self._members[mid]
            self.gossip_sent += 1
            # An unsolicited ACK with sequence 0 carries piggyback only; peers (and the reference) ignore its seq.
            self._send(ACK, m.address, mid, 0, "", None, True)
        if self._queue:
            self._gossip_due = now + self.gossip_interval
            self._push(self._gossip_due, T_GOSSIP, None, 0)

    # ------------------------------------------------------------------------------------------------------------
    # push-pull (join and anti-entropy)

    cdef list _full_state(self):
        cdef list ups = [self._self.to_update()]
        cdef _Member m
        for m in self._members.values():
            ups.append(m.to_update())
        return ups

    cdef _send_state(self, int mtype, str address, unsigned long long seq):
        """Full state, split over as many datagrams as it needs."""
        cdef Message msg = Message.__new__(Message)
        cdef list ups = self._full_state()
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t n
        msg.type = mtype
        msg.set_sender_id(self.member_id)
        msg.sequence_num = seq
        msg.set_sender_address(self.address)
        msg.timestamp_ms = self._wall_ms(self._now)
        while pos < len(ups):
            data, n = encode_limited(msg, ups[pos:], self.max_payload)
            if n == 0:
                pos += 1  # one update larger than a datagram (absurdly long strings): skip it
                continue
            pos += n
            self.updates_sent += n
            self._emit_datagram(address, data)
            self.sync_bytes_out += len(data)

    cdef _join_round(self, double now):
        # Knowing one live member is not enough to stop: a PING from a peer that has heard of us makes it known
        # (as a bare stub, see _dispatch) long before its full state arrives, and if the seeds' answers were lost
        # we would be left with stubs instead of the cluster's real metadata.
        if self._seeds and (self._n_live == 0 or not self._synced):
            self._seq += 1
            for s in self._seeds:
                self.syncs_sent += 1
                self._send_state(SYNC, s, self._seq)
        if self._seeds:
            self._push(now + self.join_retry_interval, T_JOIN, None, 0)

    cdef double _push_pull_spacing(self):
        # A full state grows with N; stretching the interval with N keeps its bytes per second flat in N.
        cdef double factor = (self._n_live + 1) / 32.0
        cdef double r = self._rng.random()
        if factor < 1.0:
            factor = 1.0
        return self.push_pull_interval * factor * (0.75 + 0.5 * r)

    cdef _reconnect_round(self, double now):
        """A DEAD member may only be behind a healed partition: offer it our state (it refutes if alive)."""
        cdef _Member m
        cdef list dead = [m for m in self._members.values() if m.state == DEAD]
        cdef double r = self._rng.random()
        cdef str target = ""
        if dead:
            target = (<_Member>dead[<Py_ssize_t>(r * len(dead))]).address
        elif self._seeds and self._n_live > 0:
            live_addresses = {(<_Member>self._members[mid]).address for mid in self._live_ids()}
            unknown = [a for a in self._seeds if a not in live_addresses]
            if unknown:
                target = unknown[<Py_ssize_t>(r * len(unknown))]
        if target:
            self._seq += 1
            self.syncs_sent += 1
            self._send_state(SYNC, target, self._seq)

    cdef _push_pull_round(self, double now):
        cdef _Member m
        cdef double spacing = self._push_pull_spacing()
        if now < self._last_push_pull + spacing:
            # The cluster grew since this timer was set (e.g. we just joined): wait for the stretched interval.
            self._push(self._last_push_pull + spacing, T_PUSH_PULL, None, 0)
            return
        self._last_push_pull = now
        picked = self._random_live(1, None)
        if picked:
            m = self._members[picked[0]]
            self._seq += 1
            self.syncs_sent += 1
            self._send_state(SYNC, m.address, self._seq)
        self._push(now + self._push_pull_spacing(), T_PUSH_PULL, None, 0)

    # ------------------------------------------------------------------------------------------------------------
    # receive path

    cdef _dispatch(self, Message msg, str source_address, double now):
        cdef int t = msg.type
        cdef str sender_id = msg.get_sender_id()
        cdef str reply_address = msg.get_sender_address() or source_address
        cdef bint sync = t == SYNC or t == SYNC_ACK
        cdef Update u
        cdef list corrections = None
        cdef _Member sender = self._members.get(sender_id)
        if t == USER:
            self._handle_user(msg, sender)
            return
        if t < PING or t > SYNC_ACK:
            self.malformed += 1
            return
        if (t == PING and msg.get_target_id() and msg.get_target_id() != self.member_id
                and not self._names_our_address(msg.get_target_id())):
            # Meant for whoever had this address before us (e.g. a restarted node under a new id).
            self.misdirected += 1
            return
        cdef list updates = msg.get_updates()
        cdef Py_ssize_t seen = 0
        cdef bint about_sender
        for u in updates:
            seen += 1
            about_sender = u.member_id == sender_id
            # Anti-entropy state is not re-gossiped (it is a full table); only news about the sender itself is.
            # The sender's last update about itself is its own word on its metadata (see _take_owner_meta).
            if self._apply(u, now, (not sync) or about_sender,
                           sender_id if about_sender and _none_about(updates, seen, sender_id) else ""):
                if corrections is None:
                    corrections = []
                corrections.append(self._self.to_update() if u.member_id == self.member_id
                                   else (<_Member>self._members[u.member_id]).to_update())
        if (sender is None and reply_address and sender_id not in self._members
                and sender_id not in self._tombstones):
            # Unknown sender that did not describe itself: learn it as ALIVE at incarnation 0; its own rumours
            # will carry its real incarnation and metadata.
            self._apply(Update(sender_id, reply_address, ALIVE, 0), now, False, "")
        if corrections is not None and t != PING:
            # The sender missed a refutation: answer its stale rumour directly rather than hope gossip reaches it.
            self.corrections_sent += 1
            self._send(ACK, reply_address, sender_id, 0, "", corrections, False)
        if t == PING:
            self._send(ACK, reply_address, sender_id, msg.sequence_num, "", corrections, True)
        elif t == ACK:
            self._handle_ack(msg, now)
        elif t == PING_REQ:
            self._handle_ping_req(msg, reply_address, now)
        elif t == NACK:
            p = self._probes.get(msg.sequence_num)
            if p is not None:
                (<_Probe>p).nacks += 1
                self.nacks_received += 1
        if sync:
            self._synced = True
        if t == SYNC:
            # A session is (sender, the sender's incarnation, sequence): a restarted sender has a new incarnation,
            # so its join SYNC is answered even when its sequence numbers repeat those of a previous life.
            sender = self._members.get(sender_id)
            key = (sender_id, sender.incarnation if sender is not None else 0, msg.sequence_num)
            if key not in self._sync_sessions:
                if len(self._sync_sessions) >= MAX_SYNC_SESSIONS:
                    self._sync_sessions.clear()
                self._sync_sessions[key] = now
                self._send_state(SYNC_ACK, reply_address, msg.sequence_num)

    # ------------------------------------------------------------------------------------------------------------
    # garbage collection

    cdef _gc(self, double now):
        cdef _Member m
        cdef list gone = []
        for mid, m in self._members.items():
            if (m.state == DEAD or m.state == LEFT) and now - m.state_since >= self.dead_gc_after:
                gone.append(m)
        for m in gone:
            del self._members[m.member_id]
            self._tombstones[m.member_id] = (m.incarnation, now)
            self._emit("removed", m)
        if self._tombstones:
            expired = [mid for mid, t in self._tombstones.items() if now - t[1] > self.tombstone_ttl]
            for mid in expired:
                del self._tombstones[mid]
        if self._sync_sessions:
            old = [k for k, t in self._sync_sessions.items() if now - t > SYNC_MEMORY]
            for k in old:
                del self._sync_sessions[k]

    cdef unsigned long long _wall_ms(self, double now):
        cdef double w = (now + self.wall_offset) * 1000.0
        return <unsigned long long>w if w > 0 else 0

    cdef int _check_fits_datagram(self, Update own) except -1:
        """Our own ALIVE update must fit one datagram beside a header naming another member (a target id of up to
        32 bytes, a full sequence number): an update that fits no datagram would never leave the dissemination
        queue. (Datagrams with longer headers, such as a PING_REQ's, may leave it to the next one.)"""
        cdef Message msg = Message.__new__(Message)
        msg.type = PING
        msg.set_sender_id(self.member_id)
        msg.set_target_id("x" * 32)
        msg.sequence_num = 0xFFFFFFFFFFFFFFFF
        msg.set_sender_address(self.address)
        msg.timestamp_ms = 0xFFFFFFFFFFFFFFFF
        _, n = encode_limited(msg, [own], self.max_payload)
        if n != 1:
            raise ValueError(f"our metadata ({own.encoded_size()} bytes on the wire) does not fit one "
                             f"{self.max_payload}-byte gossip datagram: shorten app_meta or the other fields")
        return 0


cdef bint _none_about(list updates, Py_ssize_t start, str member_id):
    """No update from position `start` on is about `member_id`."""
    cdef Py_ssize_t i
    for i in range(start, len(updates)):
        if (<Update>updates[i]).member_id == member_id:
            return False
    return True


cdef bytes _checked_app_meta(object app_meta):
    cdef bytes data
    if isinstance(app_meta, str) or app_meta is None:
        raise TypeError(f"app_meta must be bytes, not {type(app_meta).__name__}")
    data = app_meta if type(app_meta) is bytes else bytes(memoryview(app_meta))
    if len(data) > _MAX_APP_META:
        raise ValueError(f"app_meta is {len(data)} bytes, over the limit of {_MAX_APP_META}")
    return data


cdef inline Py_ssize_t _varint_len(Py_ssize_t n):
    cdef Py_ssize_t size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


cdef unsigned int _ring_key(str member_id):
    return zlib.crc32(member_id.encode("utf-8", "surrogatepass"))



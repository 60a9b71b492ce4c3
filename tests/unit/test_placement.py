"""orchestrator.core.placement: truth tables for provision / set-role / deprovision and
properties over random states: never two writers, convergence, minimality."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core import placement
from orchestrator.core.placement import (
    Attach,
    CreateImage,
    CreatePool,
    Desired,
    DesiredVm,
    Detach,
    EnsureCredentials,
    Observed,
    Plan,
    RemoveImage,
    RemoveSecret,
    RemoveUser,
)
from orchestrator.errors import ConfigError, CoordinationError, DomainNotFound
from orchestrator.ports import AttachedDisk, DiskMode, ImageInfo

pytestmark = pytest.mark.unit

URI = "qemu:///system"
SERIAL = "rbdfleet-0123456789a"
SIZE = 64 << 20
VMS = ("vm1", "vm2", "vm3")


def desired(writer: str = "vm1", spares: tuple[str, ...] = (), vms: tuple[str, ...] = VMS,
            create_pool: bool = False) -> Desired:
    return Desired("demo", "rbd", "img", SIZE, 5, create_pool, SERIAL, writer,
                   tuple(DesiredVm(n, URI, f"d-{n}", placement.vm_user("demo", n), n in spares)
                         for n in vms))


def disk(vm: str, mode: DiskMode, user: str | None = None) -> AttachedDisk:
    return AttachedDisk(SERIAL, "rbd", "img", user or placement.vm_user("demo", vm), mode, "vdz")


def observed(state: str = "", *, pool: bool = True, image: int | None = SIZE,
             extra_domains: tuple[str, ...] = (), creds: bool = True,
             users: tuple[str, ...] = VMS) -> Observed:
    """``state`` is compact: ``"vm1=rw vm2=ro"`` (domain d-NAME); ``ghost=rw`` is a domain
    outside the fleet; missing VMs are not attached."""
    domains = {(URI, f"d-{n}"): True for n in (*VMS, *extra_domains)}
    disks = {}
    for item in state.split():
        name, mode = item.split("=")
        disks[(URI, f"d-{name}")] = disk(name, DiskMode(mode))
        domains[(URI, f"d-{name}")] = True
    all_users = {placement.vm_user("demo", n) for n in (*users, *extra_domains)}
    secrets = frozenset((URI, placement.secret_usage(u)) for u in all_users if creds)
    return Observed(pool, ImageInfo("rbd", "img", image, 5) if image else None, domains, disks,
                    frozenset(all_users) if creds else frozenset(), secrets)


def kinds(plan: Plan) -> list[str]:
    """Compact transcript: ``detach vm1 rw``, ``attach vm2 ro``, ``creds vm2``..."""
    out = []
    for a in plan.actions:
        if isinstance(a, Detach):
            out.append(f"detach {a.vm or a.domain} {a.mode}")
        elif isinstance(a, Attach):
            out.append(f"attach {a.vm} {a.mode}")
        elif isinstance(a, EnsureCredentials):
            out.append(f"creds {a.vm}")
        elif isinstance(a, CreatePool):
            out.append("create pool")
        elif isinstance(a, CreateImage):
            out.append("create image")
        elif isinstance(a, RemoveSecret):
            out.append(f"rm secret {a.usage}")
        elif isinstance(a, RemoveUser):
            out.append(f"rm user {a.user}")
        elif isinstance(a, RemoveImage):
            out.append("rm image")
    return out


def apply(obs: Observed, plan: Plan) -> Observed:
    """What the world looks like after ``plan`` ran on ``obs`` (the executor's effects)."""
    disks = dict(obs.disks)
    users, secrets = set(obs.users), set(obs.secrets)
    pool, image = obs.pool_exists, obs.image
    for a in plan.actions:
        if isinstance(a, CreatePool):
            pool = True
        elif isinstance(a, CreateImage):
            image = ImageInfo(a.pool, a.image, a.size, a.features)
        elif isinstance(a, EnsureCredentials):
            users.add(a.user)
            secrets.add((a.uri, a.usage))
        elif isinstance(a, Detach):
            disks.pop((a.uri, a.domain))
        elif isinstance(a, Attach):
            assert (a.uri, a.domain) not in disks, "attach over an attached disk"
            disks[(a.uri, a.domain)] = AttachedDisk(SERIAL, "rbd", "img", a.user, a.mode, "vdz")
        elif isinstance(a, RemoveSecret):
            secrets.discard((a.uri, a.usage))
        elif isinstance(a, RemoveUser):
            users.discard(a.user)
        elif isinstance(a, RemoveImage):
            image = None
    return Observed(pool, image, dict(obs.domains), disks, frozenset(users), frozenset(secrets))


# --- provision truth table: (config writer, observed state, creds exist) -> transcript
PROVISION_TABLE = [
    ("vm1", "", True, ["attach vm2 ro", "attach vm3 ro", "attach vm1 rw"]),
    ("vm1", "", False, ["creds vm1", "creds vm2", "creds vm3",
                        "attach vm2 ro", "attach vm3 ro", "attach vm1 rw"]),
    ("vm1", "vm1=rw vm2=ro vm3=ro", True, []),
    ("vm1", "vm1=rw vm2=ro", True, ["attach vm3 ro"]),
    # set-role happened earlier: provision keeps the observed writer
    ("vm1", "vm2=rw vm1=ro vm3=ro", True, []),
    # two writers found: the configured one stays, the other is demoted first
    ("vm1", "vm1=rw vm2=rw vm3=ro", True, ["detach vm2 rw", "attach vm2 ro"]),
    ("vm1", "vm1=ro vm2=ro vm3=ro", True, ["detach vm1 ro", "attach vm1 rw"]),
]


@pytest.mark.parametrize(("writer", "state", "creds", "expected"), PROVISION_TABLE)
def test_provision_truth_table(writer: str, state: str, creds: bool,
                               expected: list[str]) -> None:
    obs = observed(state, creds=creds)
    plan = placement.plan_provision(desired(writer), obs)
    assert kinds(plan) == expected
    placement.check_single_writer(obs, plan)
    assert placement.plan_provision(desired(writer), apply(obs, plan)).empty


def test_fresh_cluster_creates_pool_and_image_first() -> None:
    obs = observed(pool=False, image=None)
    plan = placement.plan_provision(desired(create_pool=True), obs)
    assert kinds(plan)[:2] == ["create pool", "create image"]


def test_errors_come_before_any_action() -> None:
    with pytest.raises(ConfigError, match="does not exist") as err:
        placement.plan_provision(desired(), observed(pool=False, image=None))
    assert err.value.key == "ceph.pool"
    with pytest.raises(ConfigError, match="never resizes") as err:
        placement.plan_provision(desired(), observed(image=2 * SIZE))
    assert err.value.key == "fleet.size"
    obs = observed()
    del obs.domains[(URI, "d-vm3")]
    with pytest.raises(DomainNotFound, match="d-vm3"):
        placement.plan_provision(desired(), obs)


def test_adding_and_removing_a_vm_touches_only_that_vm() -> None:
    three = observed("vm1=rw vm2=ro vm3=ro")
    # vm3 removed from the config: its domain is detached, its user and secret removed
    plan = placement.plan_provision(desired(vms=("vm1", "vm2")), three)
    assert kinds(plan) == ["detach d-vm3 ro",
                           f"rm secret client.{placement.vm_user('demo', 'vm3')} secret",
                           f"rm user {placement.vm_user('demo', 'vm3')}"]
    # vm4 added
    four = observed("vm1=rw vm2=ro vm3=ro", extra_domains=("vm4",), users=VMS)
    plan = placement.plan_provision(desired(vms=(*VMS, "vm4")), replace(
        four, users=four.users - {placement.vm_user("demo", "vm4")}))
    assert kinds(plan) == ["creds vm4", "attach vm4 ro"]


def test_spare_is_not_attached_but_kept_when_attached() -> None:
    spare = desired(spares=("vm3",))
    assert kinds(placement.plan_provision(spare, observed("vm1=rw vm2=ro"))) == []
    assert placement.plan_provision(desired(spares=("vm3",)),
                                    observed("vm1=rw vm2=ro vm3=ro")).empty


# --- set-role truth table: (observed, vm, role) -> transcript
SET_ROLE_TABLE = [
    ("vm1=rw vm2=ro vm3=ro", "vm2", "writer",
     ["detach vm1 rw", "detach vm2 ro", "attach vm1 ro", "attach vm2 rw"]),
    ("vm1=rw vm2=ro vm3=ro", "vm1", "writer", []),
    ("vm1=rw vm2=ro vm3=ro", "vm3", "reader", []),
    ("vm1=rw vm2=ro", "vm3", "reader", ["attach vm3 ro"]),
    ("vm1=rw vm2=ro", "vm3", "writer", ["detach vm1 rw", "attach vm1 ro", "attach vm3 rw"]),
    ("vm2=ro vm3=ro", "vm2", "writer", ["detach vm2 ro", "attach vm2 rw"]),
]


@pytest.mark.parametrize(("state", "vm", "role", "expected"), SET_ROLE_TABLE)
def test_set_role_truth_table(state: str, vm: str, role: str, expected: list[str]) -> None:
    obs = observed(state)
    plan = placement.plan_set_role(desired(), obs, vm, role)
    assert kinds(plan) == expected
    placement.check_single_writer(obs, plan)
    after = apply(obs, plan)
    if role == "writer":
        assert [k for k, d in after.disks.items() if d.mode is DiskMode.RW] == [(URI, f"d-{vm}")]


def test_set_role_refusals() -> None:
    with pytest.raises(CoordinationError, match="vm1 is the writer"):
        placement.plan_set_role(desired(), observed("vm1=rw vm2=ro"), "vm1", "reader")
    with pytest.raises(ConfigError, match="no VM named"):
        placement.plan_set_role(desired(), observed("vm1=rw"), "vm9", "writer")
    with pytest.raises(ConfigError, match="provision"):
        placement.plan_set_role(desired(), observed(image=None), "vm2", "writer")


def test_two_writer_guard_refuses_a_bad_order() -> None:
    obs = observed("vm1=rw vm2=ro")
    bad = Plan((Detach(URI, "d-vm2", "vm2", DiskMode.RO),
                Attach(URI, "d-vm2", "vm2", "u", "s", DiskMode.RW, True),
                Detach(URI, "d-vm1", "vm1", DiskMode.RW)))
    assert placement.writers_along(obs, bad) == [1, 1, 2, 1]
    with pytest.raises(CoordinationError, match="two VMs"):
        placement.check_single_writer(obs, bad)


def test_a_fenced_read_write_holder_is_no_writer() -> None:
    # vm1 was the writer, paused and fenced; vm2 was made the writer next to its still
    # attached (fenced, useless) read-write disk. Provision keeps vm2, repairs vm1.
    obs = replace(observed("vm1=rw vm2=rw vm3=ro"), fenced=frozenset({(URI, "d-vm1")}))
    plan = placement.plan_provision(desired("vm1"), obs)
    assert kinds(plan) == ["detach vm1 rw", "attach vm1 ro"]
    assert placement.writers_along(obs, plan) == [1, 1, 1]
    assert kinds(placement.plan_set_role(desired(), obs, "vm1", "reader")) == [
        "detach vm1 rw", "attach vm1 ro"]
    assert placement.plan_set_role(desired(), obs, "vm2", "writer").empty


def test_two_writer_guard_accepts_a_fenced_holder_and_only_that() -> None:
    rw_next_to_vm1 = Plan((Detach(URI, "d-vm2", "vm2", DiskMode.RO),
                           Attach(URI, "d-vm2", "vm2", "u", "s", DiskMode.RW, True)))
    obs = observed("vm1=rw vm2=ro")
    with pytest.raises(CoordinationError, match="two VMs"):
        placement.check_single_writer(obs, rw_next_to_vm1)
    fenced = replace(obs, fenced=frozenset({(URI, "d-vm1")}))
    placement.check_single_writer(fenced, rw_next_to_vm1)
    assert placement.writers_along(fenced, rw_next_to_vm1) == [0, 0, 1]


def test_deprovision_detaches_writer_first_and_cleans_up() -> None:
    obs = observed("vm2=ro vm1=rw vm3=ro", extra_domains=("ghost",))
    obs.disks[(URI, "d-ghost")] = disk("ghost", DiskMode.RO)
    plan = placement.plan_deprovision(desired(), obs, delete_image=False)
    assert kinds(plan) == ["detach vm1 rw", "detach d-ghost ro", "detach vm2 ro", "detach vm3 ro"]
    full = placement.plan_deprovision(desired(), obs, delete_image=True)
    after = apply(obs, full)
    assert after.disks == {} and after.users == frozenset() and after.secrets == frozenset()
    assert after.image is None
    assert placement.plan_deprovision(desired(), after, delete_image=True).empty


# --- properties over random observed states
modes = st.sampled_from([None, DiskMode.RO, DiskMode.RW])


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Desired, Observed]:
    vms = VMS[: draw(st.integers(min_value=1, max_value=3))]
    writer = draw(st.sampled_from(vms))
    spares = tuple(v for v in vms if v != writer and draw(st.booleans()))
    state = " ".join(f"{n}={m}" for n in (*VMS, "ghost") if (m := draw(modes)) is not None)
    obs = observed(state, extra_domains=("ghost",), creds=draw(st.booleans()))
    if draw(st.booleans()):  # some disk attached with a foreign user
        key = draw(st.sampled_from(sorted(obs.disks))) if obs.disks else None
        if key:
            obs.disks[key] = replace(obs.disks[key], user="someone-else")
    return desired(writer, spares, vms), obs


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_provision_never_two_writers_and_converges(world: tuple[Desired, Observed]) -> None:
    want, obs = world
    plan = placement.plan_provision(want, obs)
    placement.check_single_writer(obs, plan)  # no step ever adds a second writer
    counts = placement.writers_along(obs, plan)
    assert counts[-1] == 1  # exactly one writer at the end
    after = apply(obs, plan)
    assert placement.plan_provision(want, after).empty  # convergent, then idempotent
    rw = [k for k, d in after.disks.items() if d.mode is DiskMode.RW]
    assert len(rw) == 1 and rw[0][1] in {f"d-{v.name}" for v in want.vms}


@settings(max_examples=300, deadline=None)
@given(worlds(), st.sampled_from(VMS))
def test_set_role_writer_moves_the_write_ability(world: tuple[Desired, Observed],
                                                 vm: str) -> None:
    want, obs = world
    if vm not in {v.name for v in want.vms}:
        return
    obs = apply(obs, placement.plan_provision(want, obs))  # a provisioned fleet
    plan = placement.plan_set_role(want, obs, vm, "writer")
    assert max(placement.writers_along(obs, plan)) <= 1
    after = apply(obs, plan)
    assert [k for k, d in after.disks.items() if d.mode is DiskMode.RW] == [(URI, f"d-{vm}")]
    untouched = {k: d for k, d in obs.disks.items()
                 if k not in {(URI, f"d-{vm}")} and d.mode is DiskMode.RO}
    assert all(after.disks.get(k) == d for k, d in untouched.items())


# --- cephx user names: one per (fleet, vm), never shared
# Names as the config allows them, over the characters that could make two pairs meet: the
# separators ``-`` and ``.``, the escape ``_`` and ``d`` (``_d`` stands for a dot).
ids = st.from_regex(r"\A[abd][abd_.-]{0,5}\Z")


@pytest.mark.parametrize(("one", "other"), [
    (("a-b", "c"), ("a", "b-c")), (("a.b", "c"), ("a", "b.c")), (("a_", "db"), ("a.", "b")),
    (("a__d", "b"), ("a_d", "b")), (("a", "b_dc"), ("a", "b.c")),
])
def test_user_names_that_used_to_meet_are_distinct(one: tuple[str, str],
                                                   other: tuple[str, str]) -> None:
    assert placement.vm_user(*one) != placement.vm_user(*other)


def decode_user(user: str) -> tuple[str, str]:
    """(fleet, vm) back from a user name: exists for every name, hence no two pairs share one."""
    fleet, vm = user.removeprefix(placement.USER_PREFIX).split(".")

    def unescape(part: str) -> str:
        out, chars = [], iter(part)
        for char in chars:
            out.append({"_": "_", "d": "."}[next(chars)] if char == "_" else char)
        return "".join(out)

    return unescape(fleet), unescape(vm)


@settings(max_examples=500, deadline=None)
@given(ids, ids, ids, ids)
def test_no_two_fleet_vm_pairs_share_a_user(fleet1: str, vm1: str, fleet2: str, vm2: str) -> None:
    one, other = placement.vm_user(fleet1, vm1), placement.vm_user(fleet2, vm2)
    assert decode_user(one) == (fleet1, vm1)
    assert (one == other) == ((fleet1, vm1) == (fleet2, vm2))
    # a fleet's prefix lists its own users only (list_users, the tests' checks)
    assert one.startswith(placement.fleet_user_prefix(fleet2)) == (fleet1 == fleet2)
    assert one.startswith(placement.USER_PREFIX)
    assert not one.startswith(placement.LEGACY_USER_PREFIX)


def test_a_vm_attached_under_its_legacy_user_moves_to_its_own_and_the_old_one_goes() -> None:
    legacy = "rbdfleet-demo-vm2"
    obs = observed("vm1=rw vm2=ro vm3=ro")
    obs.disks[(URI, "d-vm2")] = disk("vm2", DiskMode.RO, user=legacy)
    obs = replace(obs, users=obs.users | {legacy},
                  secrets=obs.secrets | {(URI, placement.secret_usage(legacy))})
    plan = placement.plan_provision(desired(), obs)
    assert kinds(plan) == ["detach vm2 ro", "attach vm2 ro",
                           f"rm secret client.{legacy} secret", f"rm user {legacy}"]
    assert placement.plan_provision(desired(), apply(obs, plan)).empty


def test_a_new_image_grants_every_vm_user_again() -> None:
    # users and secrets exist, but their caps name the id of an image that is gone
    plan = placement.plan_provision(desired(), observed("vm1=rw vm2=ro", image=None))
    assert kinds(plan) == ["create image", "creds vm1", "creds vm2", "creds vm3",
                           "attach vm3 ro"]

"""cvaa.distributed.compat: the private Ray internals cvaa reads still exist and work."""

import time

import pytest
import ray

from cvaa.distributed import compat


def test_installed_ray_is_the_checked_version():
    # Fails on a Ray upgrade: re-check compat.py against the new Ray, then bump TESTED_RAY.
    assert ray.__version__ == compat.TESTED_RAY


def test_the_private_names_exist():
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    assert callable(state._connect_and_get_accessor)
    fields = set(gcs_pb2.PlacementGroupTableData.DESCRIPTOR.fields_by_name)
    assert {"placement_group_id", "state", "creator_actor_id", "creator_actor_dead",
            "is_detached", "creator_job_id"} <= fields


@ray.remote(num_cpus=0)
class _Owner:
    """Creates a placement group and dies, as a stopped trial's Train controller does."""

    def make(self):
        from ray.util.placement_group import placement_group

        pg = placement_group([{"CPU": 0.5}])
        ray.get(pg.ready())
        return pg.id.hex()


@pytest.mark.ray
def test_orphaned_placement_groups_are_found_and_removed(ray_local):
    from ray.util.placement_group import placement_group, remove_placement_group

    from cvaa.distributed.sweep import remove_orphaned_placement_groups

    own = placement_group([{"CPU": 0.25}])          # the driver's own group: kept
    ray.get(own.ready())
    owner = _Owner.remote()
    orphan_id = ray.get(owner.make.remote())
    assert compat.orphaned_placement_groups() == []   # its creator still lives
    free_before = ray.available_resources().get("CPU", 0.0)
    ray.kill(owner)
    deadline = time.monotonic() + 30
    while not compat.orphaned_placement_groups():
        assert time.monotonic() < deadline, "the dead owner's group was never reported"
        time.sleep(0.5)
    assert [pg.id.hex() for pg in compat.orphaned_placement_groups()] == [orphan_id]
    assert remove_orphaned_placement_groups() == 1
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < free_before + 0.5 - 1e-6:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)
    assert compat.orphaned_placement_groups() == []
    remove_placement_group(own)

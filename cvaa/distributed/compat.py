"""The private Ray internals cvaa relies on, in one place, each checked against Ray's version.

Public Ray APIs cover everything else. What is here has no public equivalent in the Ray
version cvaa is tested with (:data:`TESTED_RAY`); on any other version it is not used (a
warning says so, and the caller falls back), and ``tests/test_compat.py`` fails when the
installed Ray no longer has what this module reads.
"""

from __future__ import annotations

import warnings

import ray

TESTED_RAY = "2.60.0"


def private_apis_usable() -> bool:
    """Whether the installed Ray is the version these internals were checked against."""
    if ray.__version__ == TESTED_RAY:
        return True
    warnings.warn(f"cvaa.distributed.compat was checked against Ray {TESTED_RAY}, not "
                  f"{ray.__version__}: orphaned placement groups are left to Ray",
                  RuntimeWarning, stacklevel=2)
    return False


def orphaned_placement_groups() -> list:
    """This job's placement groups whose creating actor is dead (``PlacementGroup`` list).

    Why it is needed: when Tune's ASHA stops a trial, Tune ends the trial's actor and with
    it the Ray Train controller it owns, so the controller cannot remove its worker group's
    placement group. Ray Train leaves that to a detached cleaner that asks the State API
    (the dashboard); without a dashboard (a local ``ray.init``, as in the tests and the
    local default) the stopped trial's CPUs and GPUs stay reserved until the sweep ends.
    The public ``ray.util.placement_group_table()`` leaves out the creator fields needed to
    tell such groups apart, so this reads the GCS table (private: ``ray._private.state``,
    ``gcs_pb2``). Groups made by the driver itself (Tune's trial bundles) have no creating
    actor and are never returned. Returns ``[]`` on an unchecked Ray version.
    """
    if not private_apis_usable():
        return []
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    table = gcs_pb2.PlacementGroupTableData
    live = (table.CREATED, table.PENDING, table.RESCHEDULING)
    job_id = ray.get_runtime_context().get_job_id()
    found = []
    for blob in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(blob)
        if (pg.state in live and not ray.ActorID(pg.creator_actor_id).is_nil()
                and pg.creator_actor_dead and not pg.is_detached
                and pg.creator_job_id.hex() == job_id):
            found.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return found

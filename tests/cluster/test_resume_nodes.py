"""Resume across nodes (docs/protocol.md "Resume"): two fluxrt processes on one database, no cluster engine (table
changes need none: each node reads the change log itself). A client whose socket is killed reconnects to the other
node with the last position it processed, which that node's reads cut into different windows."""

from __future__ import annotations

from ..support.nodes import running_nodes
from ..test_resume_tables import LIMITS, TABLE, killed_while_writing


async def test_a_killed_client_resumes_on_the_other_node_with_every_row_of_its_own_once_in_order(db, tmp_path):
    db.sql(TABLE)
    async with running_nodes(2, tmp_path, db.dsn, sections={"realtime": LIMITS}) as nodes:
        # Each reconnection goes to the other node.
        await killed_while_writing(db, [node.remote for node in nodes], seed=2)

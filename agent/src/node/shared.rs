//! The node agent's side of records shared between nodes: every record it keeps is published
//! to the tiers other nodes read, and a request for a checkpoint its catalog lacks first
//! adopts the record from such a tier, then runs as if the checkpoint had been taken here.

use actix::prelude::*;
use kybernate_dataplane::{CheckpointName, TierKind};

use super::NodeAgent;
use crate::catalog::CheckpointRecord;
use crate::error::AgentError;
use crate::shared_records;

impl NodeAgent {
    /// Puts `record` in the catalog and publishes it for other nodes.
    pub(super) fn keep_record(
        &mut self,
        ctx: &mut Context<Self>,
        name: &CheckpointName,
        record: &CheckpointRecord,
    ) -> Result<(), AgentError> {
        self.catalog.insert(name.clone(), record.clone())?;
        self.parts
            .journal
            .note(name.as_str(), crate::journal::Transition::Recorded);
        let parts = self.parts.clone();
        let record = record.clone();
        ctx.spawn(async move { shared_records::publish(&parts, &record).await }.into_actor(self));
        Ok(())
    }

    /// The name in `checkpoint_ref` when this agent does not know it but has a tier other
    /// nodes write records to, so the record may be there.
    pub(super) fn unknown_but_shared(&self, checkpoint_ref: &str) -> Option<CheckpointName> {
        let name = CheckpointName::new(checkpoint_ref).ok()?;
        let shared = self.parts.tiers.get(TierKind::S3).is_some();
        (shared && self.catalog.get(&name).is_none()).then_some(name)
    }

    /// Adopts the shared record of `name` into the catalog, then handles `msg` again. Fails
    /// with [`AgentError::NotFound`] when no tier keeps the record.
    pub(super) fn adopt_then<M, R>(
        &mut self,
        name: CheckpointName,
        msg: M,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<R, AgentError>>
    where
        Self: Handler<M>,
        M: Message<Result = Result<R, AgentError>> + Send + 'static,
        R: Send + 'static,
    {
        let parts = self.parts.clone();
        let me = ctx.address();
        let fetched_name = name.clone();
        Box::pin(
            async move { shared_records::fetch(&parts, &fetched_name).await }
                .into_actor(self)
                .then(move |fetched, agent, _| {
                    let adopted = fetched.and_then(|record| {
                        // Another request may have adopted it meanwhile.
                        if agent.catalog.get(&name).is_none() {
                            agent.catalog.insert(name.clone(), record.clone())?;
                            agent.last_used.insert(name, record.created_unix);
                        }
                        Ok(())
                    });
                    async move {
                        adopted?;
                        me.send(msg).await?
                    }
                    .into_actor(agent)
                }),
        )
    }
}

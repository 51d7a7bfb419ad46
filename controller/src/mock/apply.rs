//! A model of what the API server makes of server-side applies to one object's status, for
//! tests with two writers. Each field manager owns the top-level status fields it applied
//! and the conditions (a list-map keyed by `type`, as our CRD schemas declare) it applied.
//! An apply sets its fields and conditions, takes them from other managers (every writer of
//! ours forces), and removes the fields and conditions it owned before but left out; what
//! other managers own stays.
//!
//! Not modelled: ownership below the top-level status fields (they are atomic here), shared
//! ownership of a field two managers applied with the same value (here the last one owns
//! it), and conflicts without force.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::Recorded;

/// One object as the API server would hold it after the applies so far.
#[derive(Debug, Clone)]
pub struct AppliedObject {
    object: Value,
    fields: BTreeMap<String, String>,
    conditions: Vec<(Value, String)>,
}

impl AppliedObject {
    /// Starts from `object` (its status fields and conditions owned by `manager`).
    pub fn new(object: Value, manager: &str) -> Self {
        let mut model = Self {
            object: object.clone(),
            fields: BTreeMap::new(),
            conditions: Vec::new(),
        };
        model.apply(manager, &object);
        model
    }

    /// The object now.
    pub fn object(&self) -> Value {
        self.object.clone()
    }

    /// The object's status now.
    pub fn status(&self) -> Value {
        self.object["status"].clone()
    }

    /// Who owns each condition type now.
    pub fn condition_owners(&self) -> Vec<(String, String)> {
        self.conditions
            .iter()
            .map(|(c, m)| (c["type"].as_str().unwrap_or_default().to_owned(), m.clone()))
            .collect()
    }

    /// Handles a PATCH of the status subresource as the API server would: it must be a
    /// forced server-side apply with a field manager. Returns the reply.
    pub fn patch_status(&mut self, request: &Recorded) -> (u16, Value) {
        assert_eq!(
            request.content_type, "application/apply-patch+yaml",
            "status writes are server-side applies: {request:?}"
        );
        let manager = query_value(&request.query, "fieldManager")
            .unwrap_or_else(|| panic!("an apply names its field manager: {}", request.query));
        assert_eq!(
            query_value(&request.query, "force").as_deref(),
            Some("true"),
            "{request:?}"
        );
        self.apply(&manager, &request.body);
        (200, self.object())
    }

    /// Applies `applied["status"]` as `manager`.
    pub fn apply(&mut self, manager: &str, applied: &Value) {
        let applied = applied["status"].as_object().cloned().unwrap_or_default();
        let mut status: Map<String, Value> = self.object["status"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let dropped: Vec<String> = self
            .fields
            .iter()
            .filter(|(field, owner)| *owner == manager && !applied.contains_key(*field))
            .map(|(field, _)| field.clone())
            .collect();
        for field in dropped {
            status.remove(&field);
            self.fields.remove(&field);
        }
        for (field, value) in &applied {
            if field != "conditions" {
                status.insert(field.clone(), value.clone());
                self.fields.insert(field.clone(), manager.to_owned());
            }
        }
        let mine: Vec<Value> = applied
            .get("conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        self.conditions
            .retain(|(c, owner)| owner != manager || mine.iter().any(|m| m["type"] == c["type"]));
        for condition in mine {
            match self
                .conditions
                .iter_mut()
                .find(|(c, _)| c["type"] == condition["type"])
            {
                Some(slot) => *slot = (condition, manager.to_owned()),
                None => self.conditions.push((condition, manager.to_owned())),
            }
        }
        status.remove("conditions");
        if !self.conditions.is_empty() {
            let list: Vec<Value> = self.conditions.iter().map(|(c, _)| c.clone()).collect();
            status.insert("conditions".into(), json!(list));
        }
        self.object["status"] = Value::Object(status);
    }
}

fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_manager_keeps_its_own_conditions_and_drops_what_it_left_out() {
        let mut model = AppliedObject::new(json!({"status": {"phase": "Restoring"}}), "c");
        model.apply(
            "a",
            &json!({"status": {"staging": {"tier": "ram"}, "conditions": [{"type": "Staged"}]}}),
        );
        model.apply(
            "c",
            &json!({"status": {"phase": "Failed", "conditions": [{"type": "Failed"}]}}),
        );
        let status = model.status();
        assert_eq!(status["phase"], "Failed");
        assert_eq!(status["staging"]["tier"], "ram");
        assert_eq!(
            status["conditions"],
            json!([{"type": "Staged"}, {"type": "Failed"}])
        );
        model.apply("a", &json!({"status": {}}));
        assert_eq!(
            model.status(),
            json!({"phase": "Failed", "conditions": [{"type": "Failed"}]})
        );
    }
}

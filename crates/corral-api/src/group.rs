use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{validate_name, ObjectMeta, ValidationError};

/// Whether members of a group run together or apart.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GroupRule {
    Affinity,
    AntiAffinity,
}

/// How binding a group's rule is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupStrength {
    /// Never broken: a VM that cannot follow it stays pending.
    Must,
    /// Followed when possible.
    Should,
}

/// A set of VMs (by name, in one project) with a placement rule.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VmGroup {
    pub meta: ObjectMeta,
    pub rule: GroupRule,
    pub strength: GroupStrength,
    /// VM names; a name may be listed before its VM exists.
    pub members: Vec<String>,
}

/// Body of `POST /api/v1/projects/{project}/groups`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateGroupRequest {
    pub name: String,
    pub rule: GroupRule,
    pub strength: GroupStrength,
    pub members: Vec<String>,
}

impl CreateGroupRequest {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("group", &self.name)?;
        for m in &self.members {
            validate_name("VM", m)?;
        }
        Ok(())
    }
}

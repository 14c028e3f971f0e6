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
    /// A DNS label: 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
    pub rule: GroupRule,
    pub strength: GroupStrength,
    /// The VMs of the project in the group.
    #[schema(schema_with = crate::meta::names_schema)]
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

# Rules the YAML cannot express for finance-agent: hooked in through package
# aegis.ext.finance_agent (see docs/policy.md, "Raw Rego").
package aegis.ext.finance_agent

import rego.v1

# The policy's own rules are read by full path (data.aegis.policy.finance_agent.route): importing
# the package under an alias would make this module depend on the whole package, decision
# included, which depends on this module.

# A refund names exactly one of `charge` and `payment_intent`: a cross-field rule.
deny contains "constraint_violated: a refund names exactly one of charge and payment_intent" if {
	data.aegis.policy.finance_agent.route.action == "create_refund"
	count({name | some name in ["charge", "payment_intent"]; input.params[name]}) != 1
}
